"""Faults under load against a real `batchline serve` process: Redis dies, a model fails on some
inputs, a model is slower than its callers' deadlines, clients cancel by the thousand, SIGTERM.

Each scenario checks the invariant of tests/fault/conftest.py: no hang, no crash, no silent
loss, recovery without a restart (a final batch of good calls all succeeds).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import open_feature_store
from server.features.materialize import materialize
from server.features.view import Feature, FeatureView
from tests.fault.conftest import Load, Outcome, Servers, Tally, channel, good_batch, wait_for_metric
from tests.support.metrics import metric, scrape_async
from tests.support.models import register_with_attachment, registry_with_failing_churn, rows
from tests.support.polling import eventually
from tests.support.processes import RedisServer, ServerProcess
from tests.support.requests import entity_request, infer_request

pytestmark = pytest.mark.fault

# Each scenario's wall-clock bound; a hang fails the scenario instead of the whole run.
SCENARIO_S = 45.0
BREAKER = """
minimum_number_of_calls = 10
sliding_window_size = 20
failure_rate_threshold = 50
wait_duration_in_open_s = 0.5
permitted_calls_in_half_open = 2
"""
FAST_S = 0.5  # "at once" for a loaded 2-core machine: no lookup, no model, no waiting
GRPC_SETTLE_S = 0.5  # see the cancellation storm


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


# ---- 1. Redis killed mid-load, then restarted ---------------------------------------------


ENTITIES = 200


def _view(on_store_error: str) -> FeatureView:
    features = tuple(Feature(f"f{i}", default=-1.0) for i in range(15))
    return FeatureView("churn_features", "customer_id", features, on_store_error=on_store_error)


async def _materialize(view: FeatureView, url: str) -> None:
    rng = np.random.default_rng(0)
    table = [
        {"customer_id": f"c{i}", **{f"f{j}": float(v) for j, v in enumerate(rng.random(15))}}
        for i in range(ENTITIES)
    ]
    store = open_feature_store(url)
    try:
        await materialize(view, table, store)
    finally:
        await store.close()


@pytest.mark.parametrize("on_store_error", ["unavailable", "defaults"])
async def test_redis_killed_mid_load_fails_fast_opens_the_breaker_and_recovers_after_restart(
    on_store_error: str,
    demo_registry: Path,
    tmp_path: Path,
    servers: Servers,
    redis_server: RedisServer,
) -> None:
    """During the outage entity calls get UNAVAILABLE fast (or OK with the view's defaults),
    the feature breaker opens; after Redis restarts and the breaker's wait, calls succeed."""
    view = _view(on_store_error)
    registry = tmp_path / "registry"
    shutil.copytree(demo_registry, registry)
    register_with_attachment(registry, "churn", "1", "feature_view.json", view.to_json())
    await _materialize(view, redis_server.url)
    server = servers.start(
        registry,
        f'[server]\nfeature_store = "{redis_server.url}"\nfeature_timeout_ms = 50\n'
        f"[server.feature_breaker]\n{BREAKER}",
        "churn@production",
    )
    rng = random.Random(1)

    def make(i: int) -> tuple[pb.ModelInferRequest, str]:
        ids = [f"c{rng.randrange(ENTITIES)}" for _ in range(1 + i % 3)]
        return entity_request(ids), "entity"

    tally = Tally()
    breaker = {"breaker": "feature_store"}
    async with asyncio.timeout(SCENARIO_S), channel(server) as stub:
        async with Load(stub, tally, make, workers=16, timeout=2.0):
            await eventually(
                lambda: len(tally.outcomes) >= 200, timeout=10, what="200 healthy calls"
            )
            redis_server.kill()
            killed = time.monotonic()
            opened_after = await wait_for_metric(
                server, "batchline_breaker_state", 1, within=5, **breaker
            )
            await asyncio.sleep(1.0)  # an outage long enough for open -> half-open -> open
            restarted = time.monotonic()
            await asyncio.to_thread(redis_server.start)
            await _materialize(view, redis_server.url)
            await wait_for_metric(server, "batchline_breaker_state", 0, within=10, **breaker)
            closed = time.monotonic()
            await asyncio.sleep(0.3)  # a little traffic on the closed breaker
        final = await good_batch(stub, lambda i: entity_request([f"c{i % ENTITIES}"]), 100)
        samples = await scrape_async(server.metrics_port)

    before = [o for o in tally.outcomes if o.finished < killed]
    outage = [o for o in tally.outcomes if killed < o.started and o.finished < restarted]
    after = [o for o in tally.outcomes if o.started > closed]
    print(
        f"redis ({on_store_error}): {dict(tally.codes())}; {len(outage)} calls in the outage, "
        f"p50/p99 {_p([o.seconds for o in outage], 50) * 1e3:.1f}/"
        f"{_p([o.seconds for o in outage], 99) * 1e3:.1f} ms; breaker open after "
        f"{opened_after:.2f}s, closed {closed - restarted:.2f}s after the restart"
    )
    tally.assert_none_lost()
    Servers.alive(server)
    assert tally.codes().keys() <= {"OK", "UNAVAILABLE"}, tally.codes()
    assert before
    assert all(o.code == "OK" and not o.parameters for o in before)
    assert len(outage) >= 50, f"only {len(outage)} calls during the outage"
    if on_store_error == "unavailable":
        assert {o.code for o in outage} == {"UNAVAILABLE"}
        failed_over = [o for o in outage if "circuit breaker feature_store" in o.details]
    else:
        assert {o.code for o in outage} == {"OK"}
        assert all(o.parameters.get("features_fallback") == "defaults" for o in outage)
        failed_over = outage
    assert failed_over, "no call was answered by the open breaker"
    latencies = [o.seconds for o in outage]
    # Fast: the typical outage call is answered at once (no call waited out its 2 s deadline:
    # no DEADLINE_EXCEEDED above). The median, not p99: with several suites on two cores, a
    # few calls are delayed by the scheduler, which says nothing about the breaker.
    assert _p(latencies, 50) < FAST_S, f"outage p50 {_p(latencies, 50) * 1000:.0f} ms"
    assert opened_after < 3.0
    assert after
    assert all(o.code == "OK" for o in after)
    assert all(o.code == "OK" and not o.parameters for o in final)
    assert metric(samples, "batchline_breaker_transitions_total", to_state="OPEN", **breaker) >= 1
    assert metric(samples, "batchline_breaker_state", **breaker) == 0
    Servers.stop(server)


# ---- 2. A model that fails on some inputs ---------------------------------------------------


@pytest.mark.parametrize("fallback", ["unavailable", "static"])
async def test_a_model_failing_on_some_inputs_opens_its_breaker_and_closes_on_good_load(
    fallback: str, demo_registry: Path, tmp_path: Path, servers: Servers
) -> None:
    """Mixed load: bad calls INTERNAL, good ones OK until the breaker opens, then UNAVAILABLE
    (or the static fallback) at once; with only good load left, it closes after its wait."""
    registry, failing = registry_with_failing_churn(demo_registry, tmp_path)
    extra = (
        'fallback = "static"\n[models.churn.fallback_outputs]\nlabel = 0\n'
        "probabilities = [0.9, 0.1]\n"
        if fallback == "static"
        else ""
    )
    # Batching off: a poisoned request then fails alone (in a batch it fails its batch-mates).
    server = servers.start(
        registry,
        f'[models.churn]\nref = "churn@production"\ndynamic_batching = false\n{extra}'
        f"[models.churn.breaker]\n{BREAKER}",
    )
    breaker = {"breaker": f"model:churn:{failing}"}
    good = infer_request(rows(1, poison=False), "churn")
    bad = infer_request(rows(1, poison=True), "churn")

    def mixed(i: int) -> tuple[pb.ModelInferRequest, str]:
        return (bad, "bad") if i % 5 < 3 else (good, "good")

    tally = Tally()
    async with asyncio.timeout(SCENARIO_S), channel(server) as stub:
        async with Load(stub, tally, mixed, workers=16, timeout=2.0):
            await wait_for_metric(server, "batchline_breaker_state", 1, within=10, **breaker)
            await asyncio.sleep(1.0)  # open -> half-open -> (bad probes) -> open, under load
        # Every bad call has its answer: none still in flight can reach a closed breaker late
        # (on a loaded machine some did, and re-opened it after the test saw it close).
        only_good = time.monotonic()
        async with Load(stub, tally, lambda i: (good, "good"), workers=16, timeout=2.0):
            await wait_for_metric(server, "batchline_breaker_state", 0, within=10, **breaker)
            closed = time.monotonic()
            await asyncio.sleep(0.3)
        final = await good_batch(stub, lambda i: good, 100)
        samples = await scrape_async(server.metrics_port)

    print(
        f"failing model ({fallback}): bad {dict(tally.codes(lambda o: o.tag == 'bad'))}, "
        f"good {dict(tally.codes(lambda o: o.tag == 'good'))}; closed "
        f"{closed - only_good:.2f}s after the bad load stopped"
    )
    tally.assert_none_lost()
    Servers.alive(server)

    def codes(tag: str, since: float = 0.0, until: float = float("inf")) -> set[str]:
        return {o.code for o in tally.outcomes if o.tag == tag and since < o.started < until}

    def by_fallback(o: Outcome) -> bool:
        return o.code == "OK" and o.parameters.get("fallback") == "static"

    if fallback == "unavailable":
        assert codes("bad") == {"INTERNAL", "UNAVAILABLE"}
        assert codes("good") == {"OK", "UNAVAILABLE"}
        rejected = [o for o in tally.outcomes if o.code == "UNAVAILABLE"]
        assert all(f"model:churn:{failing}" in o.details for o in rejected)
    else:
        assert codes("bad") == {"INTERNAL", "OK"}
        assert codes("good") == {"OK"}
        rejected = [o for o in tally.outcomes if by_fallback(o)]
        assert all(by_fallback(o) for o in tally.outcomes if o.tag == "bad" and o.code == "OK")
    assert rejected
    assert _p([o.seconds for o in rejected], 50) < FAST_S  # at once (median: see the Redis test)
    # Before the breaker first opened, every good call ran the model and succeeded.
    first_open = min(o.started for o in rejected)
    assert all(
        o.code == "OK" and not o.parameters
        for o in tally.outcomes
        if o.tag == "good" and o.finished < first_open
    )
    assert codes("good", since=closed) == {"OK"}
    late = [o for o in tally.outcomes if o.tag == "good" and o.started > closed and o.parameters]
    assert not late, [(o.parameters, o.started - closed, o.finished - closed) for o in late[:5]]
    assert closed - only_good < 5.0
    assert all(o.code == "OK" and o.version == failing and not o.parameters for o in final)
    transitions = "batchline_breaker_transitions_total"
    assert metric(samples, transitions, from_state="HALF_OPEN", to_state="CLOSED", **breaker) >= 1


# ---- 3. A model slower than its callers' deadlines -------------------------------------------


async def test_a_model_slower_than_deadlines_answers_deadline_exceeded_and_leaks_nothing(
    demo_registry: Path, servers: Servers
) -> None:
    """64-row churn_mlp calls (a batch takes ~5 ms, so a queue of them takes far longer) with
    deadlines of 2-60 ms end DEADLINE_EXCEEDED, or OK when they get through in time; 1-row calls
    with a normal deadline stay OK throughout; afterwards queue rows and in-flight are 0."""
    server = servers.start(demo_registry, "", "churn_mlp@production")
    x = np.random.default_rng(0).random((64, 15), dtype=np.float32)
    big = infer_request(x, "churn_mlp")
    small = infer_request(x[:1], "churn_mlp")
    model = {"model": "churn_mlp"}
    rng = random.Random(3)
    tally = Tally()
    busy: list[tuple[float, float]] = []  # (requests in flight, queue rows) during the storm
    async with asyncio.timeout(SCENARIO_S), channel(server) as stub:
        slow = Load(
            stub,
            tally,
            lambda i: (big, "slow"),
            workers=16,
            # Most deadlines (2-10 ms) die anywhere, often in gRPC's core before Python sees
            # the call on a busy machine; a third (20-60 ms) reach the queue and expire there.
            timeout=lambda: (
                rng.uniform(0.002, 0.01) if rng.random() < 0.67 else rng.uniform(0.02, 0.06)
            ),
        )
        normal = Load(stub, tally, lambda i: (small, "normal"), workers=4, timeout=2.0)
        async with slow, normal:
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                samples = await scrape_async(server.metrics_port)
                busy.append(
                    (
                        metric(samples, "batchline_requests_in_flight"),
                        metric(samples, "batchline_queue_rows", **model),
                    )
                )
                await asyncio.sleep(0.05)
        drained = await eventually(
            _idle(server, model), timeout=5, what="queue and in-flight back to 0"
        )
        final = await good_batch(stub, lambda i: infer_request(x[: 1 + i % 64], "churn_mlp"), 100)
        samples = await scrape_async(server.metrics_port)

    late = tally.codes(lambda o: o.tag == "slow")
    on_time = tally.codes(lambda o: o.tag == "normal")
    expired = metric(samples, "batchline_dropped_requests_total", reason="deadline", **model)
    # A caller's deadline reaches the queue two ways: the batcher finds it passed (reason
    # "deadline"), or gRPC cancels the call first (reason "cancelled"). Which one wins is a race
    # that a busy second core decides; either way the request left the queue before the model.
    cancelled = metric(samples, "batchline_dropped_requests_total", reason="cancelled", **model)
    print(
        f"slow model: slow {dict(late)}, normal {dict(on_time)}; in flight / queue rows seen up "
        f"to {max(b[0] for b in busy):.0f} / {max(b[1] for b in busy):.0f}; the server expired "
        f"{expired:.0f} and dropped {cancelled:.0f} cancelled queued requests; drained in "
        f"{drained:.2f}s"
    )
    tally.assert_none_lost()
    Servers.alive(server)
    assert set(late) <= {"OK", "DEADLINE_EXCEEDED"}, late
    assert late["DEADLINE_EXCEEDED"] >= 100, late
    assert set(on_time) == {"OK"}, on_time
    assert on_time["OK"] >= 50, on_time
    assert all(o.code == "OK" for o in final)
    assert drained < 5
    assert metric(samples, "batchline_queue_rows", **model) == 0
    assert metric(samples, "batchline_requests_in_flight") == 0
    # The server saw the storm (a gauge that never moves proves nothing) and dropped expired
    # (or deadline-cancelled) requests before they reached the model: requests expire only while queued, so the queue
    # gauge read back 0 above after holding rows. (Sampling the queue gauge every 50 ms can miss
    # a queue that fills and drains between samples on a loaded machine: not asserted.)
    assert max(b[0] for b in busy) > 0, busy
    assert expired + cancelled > 0
    Servers.stop(server)


def _idle(server: ServerProcess, model: dict[str, str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        samples = await scrape_async(server.metrics_port)
        return (
            metric(samples, "batchline_queue_rows", **model) == 0
            and metric(samples, "batchline_requests_in_flight") == 0
        )

    return check


# ---- 4. Thousands of client cancellations and deadline expiries -------------------------------


async def test_thousands_of_cancellations_and_expiries_leave_the_server_serving_and_empty(
    demo_registry: Path, servers: Servers
) -> None:
    """3000 churn_mlp calls: 1000 cancelled by the client 1-50 ms after sending, then 2000 with
    deadlines of 0.1-5 ms; every one ends OK, DEADLINE_EXCEEDED or CANCELLED (or
    RESOURCE_EXHAUSTED when the bounded queue is full); afterwards good
    calls succeed and the queue and in-flight are 0. The cancellations go first, on their own:
    mixed into a storm of tiny deadlines, grpcio may end most calls before the server sees them
    (see below), and then no cancellation reaches the server at all."""
    server = servers.start(demo_registry, "", "churn_mlp@production")
    rng = random.Random(4)
    x = np.random.default_rng(4).random((64, 15), dtype=np.float32)
    requests = [infer_request(x[: n + 1], "churn_mlp") for n in range(64)]
    model = {"model": "churn_mlp"}
    sent = 0
    ended: list[str] = []
    limit = asyncio.Semaphore(64)

    async def one(i: int, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        nonlocal sent
        async with limit:
            cancel = i % 3 == 0
            deadline = 1.0 if cancel else rng.uniform(0.0001, 0.005)
            sent += 1
            call = stub.ModelInfer(requests[i % 64], timeout=deadline)
            if cancel:
                await asyncio.sleep(rng.uniform(0.001, 0.05))
                call.cancel()
            code = await asyncio.wait_for(call.code(), 5.0)
            ended.append(code.name)

    async with asyncio.timeout(SCENARIO_S), channel(server) as stub:
        await asyncio.gather(*(one(i, stub) for i in range(3000) if i % 3 == 0))
        await asyncio.gather(*(one(i, stub) for i in range(3000) if i % 3 != 0))
        drained = await eventually(
            _idle(server, model), timeout=5, what="queue and in-flight back to 0"
        )
        # grpcio (1.85, seen with a bare grpc.aio server too) may end calls that start within
        # ~50-300 ms of such a storm CANCELLED, neither side having cancelled them; the server
        # itself is idle by now. Recovery is judged once that has passed.
        await asyncio.sleep(GRPC_SETTLE_S)
        final = await good_batch(stub, lambda i: requests[i % 64], 200, concurrency=32)
        samples = await scrape_async(server.metrics_port)

    codes = {c: ended.count(c) for c in set(ended)}
    dropped = {
        r: metric(samples, "batchline_dropped_requests_total", reason=r, **model)
        for r in ("cancelled", "deadline")
    }
    seen = {
        c: metric(samples, "batchline_requests_total", status=c, **model)
        for c in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")
    }
    print(
        f"cancellations: {codes}; server answered {seen}, dropped {dropped}; "
        f"drained in {drained:.2f}s"
    )
    assert sent == len(ended) == 3000, f"{sent} sent, {len(ended)} ended"
    # RESOURCE_EXHAUSTED: up to 64 calls of up to 64 rows may overfill the 2048-row queue.
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("CANCELLED", 0) >= 500, codes
    assert codes.get("DEADLINE_EXCEEDED", 0) >= 500, codes
    Servers.alive(server)
    assert all(o.code == "OK" for o in final)
    assert drained < 5
    assert metric(samples, "batchline_queue_rows", **model) == 0
    assert metric(samples, "batchline_requests_in_flight") == 0
    assert seen["CANCELLED"] > 0, "no cancellation reached the server"
    Servers.stop(server)


# ---- 5. SIGTERM under load --------------------------------------------------------------------


async def test_sigterm_under_load_answers_every_call_ok_or_unavailable_and_exits_0_in_grace(
    demo_registry: Path, servers: Servers
) -> None:
    """32 callers on churn_mlp (batches in the executor); SIGTERM once 300 calls are answered.
    Each caller stops at its first UNAVAILABLE, as a client leaving a draining server does."""
    server = servers.start(
        demo_registry,
        '[models.churn_mlp]\nref = "churn_mlp@production"\nexecution = "executor"\n',
        "churn_mlp@production",
        grace=5.0,
    )
    x = np.random.default_rng(5).random((8, 15), dtype=np.float32)
    requests = [infer_request(x[: n + 1], "churn_mlp") for n in range(8)]
    tally = Tally()
    async with asyncio.timeout(SCENARIO_S), channel(server) as stub:
        load = Load(
            stub,
            tally,
            lambda i: (requests[i % 8], "load"),
            workers=32,
            timeout=5.0,
            stop_on=frozenset({"UNAVAILABLE"}),
        )
        async with load:
            await eventually(
                lambda: len(tally.outcomes) >= 300, timeout=15, what="300 answered calls"
            )
            server.proc.send_signal(signal.SIGTERM)
            sigterm = time.monotonic()
            await eventually(lambda: load.finished, timeout=10, what="every caller told")
        code = await asyncio.to_thread(server.proc.wait, 10)
        exited = time.monotonic() - sigterm

    print(f"sigterm: {dict(tally.codes())}; exit after {exited:.2f}s")
    tally.assert_none_lost()
    wrong = [
        f"{o.code} ({o.details}) for a call sent {o.started - sigterm:+.3f}s after SIGTERM"
        for o in tally.outcomes
        if o.code not in ("OK", "UNAVAILABLE")
    ]
    assert not wrong, f"{len(wrong)} calls ended otherwise than OK or UNAVAILABLE: {wrong[:5]}"
    assert all(o.code == "OK" for o in tally.outcomes if o.finished < sigterm)
    refused = [o for o in tally.outcomes if o.code == "UNAVAILABLE"]
    reasons = {o.details for o in refused}
    assert all("shutting down" in r or "connect" in r.lower() for r in reasons), reasons
    log = server.log.read_text()
    assert code == 0, log[-4000:]
    assert exited < 5.0
    assert "unanswered" not in log
