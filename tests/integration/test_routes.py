"""Canary and shadow routes on a real server: split, stickiness, mirroring, shedding, changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from registry_client.demo import load_reference
from server._proto import admin_pb2 as admin
from server._proto import admin_pb2_grpc as admin_grpc
from server._proto import inference_pb2_grpc as pb_grpc
from server.shadow import compare
from tests.support.apps import AppFactory
from tests.support.polling import eventually
from tests.support.requests import infer_request, probabilities


async def test_canary_takes_its_share_sticky_by_request_id(
    start_app: AppFactory, demo_registry: Path
) -> None:
    app = await start_app(models=("churn@production",), canary="2", canary_percent=30.0)
    x = np.zeros((1, 15), np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ids = [f"customer-{i}" for i in range(1500)]
        replies = []
        # At most 100 calls in flight: far beyond that, grpc.aio itself cancels a few percent
        # of calls on one channel before they reach any handler (the echo server does too).
        for start in range(0, len(ids), 100):
            chunk = ids[start : start + 100]
            replies += await asyncio.gather(
                *(stub.ModelInfer(infer_request(x, id=i), timeout=30) for i in chunk)
            )
        versions = {i: r.model_version for i, r in zip(ids, replies, strict=True)}
        share = sum(v == "2" for v in versions.values()) / len(ids)
        assert 0.25 <= share <= 0.35, share
        for reply in replies:
            assert (reply.parameters["route"].string_param == "canary") == (
                reply.model_version == "2"
            )
        again = await asyncio.gather(
            *(stub.ModelInfer(infer_request(x, id=i), timeout=30) for i in ids[:200])
        )
        assert [r.model_version for r in again] == [versions[i] for i in ids[:200]]
        pinned = await stub.ModelInfer(infer_request(x, id=ids[0], version="1"), timeout=10)
        assert pinned.model_version == "1"


async def test_shadow_never_changes_primary_answers_and_its_pairs_report_correctly(
    start_app: AppFactory, demo_registry: Path
) -> None:
    X, _ = load_reference(demo_registry, "churn", "1")
    plain = await start_app(models=("churn@production",))
    # No shedding here: this test counts every pair (a loaded machine can lag the loop).
    mirrored = await start_app(
        models=("churn@production",), shadows=("2",), shadow_max_loop_busy=1.5
    )
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{plain.grpc_port}") as a,
        grpc.aio.insecure_channel(f"127.0.0.1:{mirrored.grpc_port}") as b,
    ):
        stub_a, stub_b = pb_grpc.GRPCInferenceServiceStub(a), pb_grpc.GRPCInferenceServiceStub(b)
        requests = [infer_request(X[i : i + 2], id=f"r{i}") for i in range(0, 400, 2)]
        expected = await asyncio.gather(*(stub_a.ModelInfer(r, timeout=30) for r in requests))
        got = await asyncio.gather(*(stub_b.ModelInfer(r, timeout=30) for r in requests))
    for e, g in zip(expected, got, strict=True):
        assert g.model_version == "1"
        assert g.id == e.id
        np.testing.assert_array_equal(probabilities(g), probabilities(e))
    mirror = mirrored.models.mirror("churn")
    assert mirror is not None
    await mirror.join()
    pairs = mirrored.pair_log.pairs()
    assert len(pairs) == len(requests)
    # The report's numbers, recomputed here from the same pairs.
    (report,) = compare(pairs)
    primary = np.concatenate([p.primary_scores for p in pairs])
    shadow = np.concatenate([p.shadow_scores for p in pairs])
    agree = np.mean(np.concatenate([np.equal(p.primary_labels, p.shadow_labels) for p in pairs]))
    assert report.shadow_version == "2"
    assert report.label_agreement == pytest.approx(agree)
    assert report.requests == len(requests)
    assert report.mean_abs_diff == pytest.approx(np.mean(np.abs(primary - shadow)), rel=1e-6)


async def test_route_changes_by_admin_rpc_without_a_restart_or_a_lost_request(
    start_app: AppFactory, demo_registry: Path
) -> None:
    app = await start_app(models=("churn@production",))
    x = np.zeros((1, 15), np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        adm = admin_grpc.AdminServiceStub(channel)
        done = asyncio.Event()
        errors: list[grpc.StatusCode] = []
        seen: set[str] = set()

        async def client(n: int) -> None:
            i = 0
            while not done.is_set():
                try:
                    reply = await stub.ModelInfer(infer_request(x, id=f"c{n}-{i}"), timeout=10)
                    seen.add(reply.model_version)
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc.code())
                i += 1

        load = [asyncio.create_task(client(n)) for n in range(8)]
        route = await adm.SetRoute(
            admin.RouteSpec(model="churn", canary="2", canary_percent=50.0), timeout=30
        )
        assert (route.primary, route.canary, route.canary_percent) == ("1", "2", 50.0)
        try:
            await eventually(lambda: "2" in seen, timeout=5, what="an answer from the canary")
        finally:
            done.set()
            await asyncio.gather(*load)
        assert errors == []
        assert seen == {"1", "2"}
        current = await adm.GetRoute(admin.GetRouteRequest(model="churn"), timeout=10)
        assert current.canary == "2"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await adm.SetRoute(
                admin.RouteSpec(model="churn", canary="99", canary_percent=5.0), timeout=30
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "99" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await adm.SetRoute(
                admin.RouteSpec(model="churn", canary="2", canary_percent=150.0), timeout=30
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "canary_percent" in (bad.value.details() or "")


async def test_shadows_are_shed_not_queued_when_the_mirror_is_full(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",), shadows=("2",), shadow_queue_size=1)
    mirror = app.models.mirror("churn")
    assert mirror is not None
    await mirror.stop()  # nothing drains the mirror: offers beyond its capacity must be shed
    x = np.zeros((1, 15), np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = await asyncio.gather(
            *(stub.ModelInfer(infer_request(x, id=f"r{i}"), timeout=10) for i in range(50))
        )
    assert all(r.model_version == "1" for r in replies)
    counters = mirror.counters
    assert counters.offered == 50
    assert counters.completed == 0


async def test_shadows_are_shed_while_the_event_loop_has_no_spare_cpu(
    start_app: AppFactory,
) -> None:
    """No spare CPU (the loop thread busier than shadow_max_loop_busy): mirrored work is shed."""
    app = await start_app(models=("churn@production",), shadows=("2",), shadow_max_loop_busy=0.01)
    load = app.models.loop_load
    load.busy = 1.0  # as the probe reads a loop thread busy all the time
    x = np.zeros((1, 15), np.float32)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(20):
            reply = await stub.ModelInfer(infer_request(x, id=f"r{i}"), timeout=10)
            assert reply.model_version == "1"
            load.busy = 1.0
    mirror = app.models.mirror("churn")
    assert mirror is not None
    assert mirror.counters.shed_load == 20
    assert mirror.counters.completed == 0
