"""Circuit breakers, fallbacks and overload on a real server with a model that really fails."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from server.clock import FakeClock
from tests.support.apps import AppFactory
from tests.support.models import registry_with_failing_churn, rows
from tests.support.requests import infer_request


def _config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "batchline.toml"
    path.write_text(body)
    return str(path)


BREAKER = """
[models.churn]
ref = "churn@production"
{extra}
[models.churn.breaker]
minimum_number_of_calls = 4
sliding_window_size = 4
failure_rate_threshold = 50
wait_duration_in_open_s = 30
permitted_calls_in_half_open = 2
"""


async def _fail_until_open(stub: pb_grpc.GRPCInferenceServiceStub, app: App) -> None:
    """Poisoned requests (each INTERNAL: the model ran and failed) until the breaker opens."""
    breaker = app.models.get("churn").breaker
    codes = []
    for _ in range(10):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(infer_request(rows(1, poison=True)), timeout=10)
        codes.append(err.value.code())
        if breaker.state.name == "OPEN":
            break
    assert breaker.state.name == "OPEN"
    assert set(codes) == {grpc.StatusCode.INTERNAL}


async def _start(
    start_app: AppFactory,
    demo_registry: Path,
    tmp_path: Path,
    extra: str = "",
    clock: FakeClock | None = None,
) -> tuple[App, str]:
    registry, failing = registry_with_failing_churn(demo_registry, tmp_path)
    config = _config(tmp_path, BREAKER.format(extra=extra))
    app = await start_app(models=(), config=config, registry=registry, clock=clock)
    return app, failing


async def test_failing_model_opens_its_breaker_and_then_answers_unavailable_at_once(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    app, failing = await _start(start_app, demo_registry, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        good = await stub.ModelInfer(infer_request(rows(2, poison=False)), timeout=10)
        assert good.model_version == failing
        await _fail_until_open(stub, app)
        calls_before = app.models.get("churn").stats.execution_count
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(infer_request(rows(1, poison=False)), timeout=10)
        assert time.monotonic() - start < 0.5
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"model:churn:{failing}" in (err.value.details() or "")
        assert app.models.get("churn").stats.execution_count == calls_before  # never ran
    assert app.metrics.breaker_state.labels(f"model:churn:{failing}")._value.get() == 1


async def test_open_breaker_answers_the_static_fallback_and_says_so(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    extra = 'fallback = "static"\n[models.churn.fallback_outputs]\nlabel = 0\nprobabilities = [0.9, 0.1]\n'
    app, failing = await _start(start_app, demo_registry, tmp_path, extra)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _fail_until_open(stub, app)
        reply = await stub.ModelInfer(infer_request(rows(3, poison=False)), timeout=10)
    assert reply.parameters["fallback"].string_param == "static"
    probs = np.frombuffer(reply.raw_output_contents[1], dtype=np.float32).reshape(3, 2)
    labels = np.frombuffer(reply.raw_output_contents[0], dtype=np.int64)
    np.testing.assert_array_equal(probs, np.tile([0.9, 0.1], (3, 1)).astype(np.float32))
    np.testing.assert_array_equal(labels, [0, 0, 0])
    assert app.metrics.fallbacks.labels("churn", failing, "static").value == 1


async def test_open_breaker_falls_back_to_the_previous_version(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    app, _ = await _start(
        start_app, demo_registry, tmp_path, 'fallback = "previous"\nfallback_ref = "churn@1"\n'
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _fail_until_open(stub, app)
        reply = await stub.ModelInfer(infer_request(rows(2, poison=False)), timeout=10)
    assert reply.model_version == "1"
    assert reply.parameters["fallback"].string_param == "previous:1"


async def test_breaker_probes_in_half_open_and_closes_when_the_model_recovers(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    clock = FakeClock()
    app, failing = await _start(start_app, demo_registry, tmp_path, clock=clock)
    breaker = app.models.get("churn").breaker
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await _fail_until_open(stub, app)
        assert breaker.state.name == "OPEN"
        clock.advance(31)
        # The first two calls are the half-open probes; both succeed and close the breaker.
        for _ in range(2):
            await stub.ModelInfer(infer_request(rows(1, poison=False)), timeout=10)
        assert breaker.state.name == "CLOSED"
        await stub.ModelInfer(infer_request(rows(1, poison=False)), timeout=10)
        # Failing probes re-open it.
        await _fail_until_open(stub, app)
        clock.advance(31)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ModelInfer(infer_request(rows(1, poison=True)), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ModelInfer(infer_request(rows(1, poison=True)), timeout=10)
        assert breaker.state.name == "OPEN"
    transitions = app.metrics.breaker_transitions
    assert transitions.labels(f"model:churn:{failing}", "HALF_OPEN", "CLOSED")._value.get() == 1
    assert transitions.labels(f"model:churn:{failing}", "HALF_OPEN", "OPEN")._value.get() == 1


async def test_a_poisoned_batch_fails_only_its_own_callers(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path
) -> None:
    """One bad request in a burst fails only the batch it rode in; the server keeps serving."""
    app, _ = await _start(start_app, demo_registry, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        good = await asyncio.gather(
            *(stub.ModelInfer(infer_request(rows(1, poison=False)), timeout=10) for _ in range(8)),
            return_exceptions=True,
        )
        assert all(isinstance(r, pb.ModelInferResponse) for r in good)
        after = await stub.ModelInfer(infer_request(rows(1, poison=False)), timeout=10)
        assert after.outputs


async def test_requests_over_the_in_flight_cap_get_resource_exhausted_at_once(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn_mlp@production",), max_in_flight=4, execution="executor")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        x = np.zeros((64, 15), dtype=np.float32)
        results = await asyncio.gather(
            *(stub.ModelInfer(infer_request(x, "churn_mlp"), timeout=30) for _ in range(40)),
            return_exceptions=True,
        )
    rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert rejected, "the cap never bit"
    for r in rejected:
        assert r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_in_flight" in (r.details() or "")
    assert len(rejected) < 40
    assert app.models.get("churn_mlp").in_flight == 0


async def test_a_model_slower_than_timeout_ms_answers_deadline_exceeded_and_counts_as_failure(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn_mlp@production",), timeout_ms=0.01, execution="executor")
    breaker = app.models.get("churn_mlp").breaker
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(
                infer_request(np.zeros((64, 15), np.float32), "churn_mlp"), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout_ms" in (err.value.details() or "")
    assert breaker.metrics(0.0).buffered_calls == 1


async def test_a_failed_request_is_one_json_log_line_with_its_ids(
    start_app: AppFactory, demo_registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from server.observability.logging import JsonFormatter

    app, failing = await _start(start_app, demo_registry, tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = infer_request(rows(1, poison=True))
        request.id = "bad-request-7"
        with (
            caplog.at_level(logging.ERROR, logger="server.pipeline"),
            pytest.raises(grpc.aio.AioRpcError),
        ):
            await stub.ModelInfer(request, timeout=10)
    (record,) = [r for r in caplog.records if r.name == "server.pipeline"]
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "error"
    assert line["request_id"] == "bad-request-7"
    assert (line["model"], line["version"]) == ("churn", failing)
