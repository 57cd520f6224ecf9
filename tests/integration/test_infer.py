"""ModelInfer end to end over real gRPC: batching, routing errors, shedding, deadlines,
cancellation, streaming, health and metrics, against an in-process App on the test's loop.

Tests that need requests to *wait* in a queue hold the model's only executor thread with an
`ExecutorPlug` (a real ThreadPoolExecutor task blocked on an event): the batcher then sees no
free instance and queues deterministically, without sleeps or timing luck.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry_client import FileRegistry
from registry_client.demo import Holdout, load_holdout
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from server.models import ServedModel
from tests.support.apps import AppFactory
from tests.support.metrics import scrape_async
from tests.support.polling import eventually
from tests.support.requests import infer_request, outputs_of

MLP = "churn_mlp"
MLP_REF = "churn_mlp@production"
TIMEOUT = 10.0


# ---- helpers ------------------------------------------------------------------------------


def assert_rows_match(response: pb.ModelInferResponse, expected: dict[str, np.ndarray]) -> None:
    got = outputs_of(response)
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-5)


class ExecutorPlug:
    """Occupies a served model's single executor thread until released."""

    def __init__(self, served: ServedModel) -> None:
        executor = served.runtime.executor
        assert executor is not None, "the plug needs execution='executor'"
        self._gate = threading.Event()
        self._held = executor.submit(self._gate.wait, TIMEOUT * 3)

    def release(self) -> None:
        self._gate.set()


@pytest.fixture
def plugs() -> Iterator[Callable[[ServedModel], ExecutorPlug]]:
    made: list[ExecutorPlug] = []

    def make(served: ServedModel) -> ExecutorPlug:
        made.append(ExecutorPlug(served))
        return made[-1]

    yield make
    for plug in made:  # never leave a thread blocked: App.stop joins the executor
        plug.release()


@pytest.fixture(scope="module")
def holdout(demo_registry: Path) -> Holdout:
    return load_holdout(demo_registry, MLP, "1")


@pytest.fixture(scope="module")
def reference(demo_registry: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """onnxruntime run in the test process on the very artifact the server serves."""
    registry = FileRegistry(demo_registry)
    path = registry.fetch(registry.get_version(MLP, "1"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(rows: np.ndarray) -> dict[str, np.ndarray]:
        label, probabilities = session.run(["label", "probabilities"], {"input": rows})
        return {"label": label, "probabilities": probabilities}

    return run


def channel_to(app: App) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")


@pytest.fixture
async def executor_app(start_app: AppFactory) -> App:
    """churn_mlp alone, batches in a one-thread executor (so an ExecutorPlug can hold it)."""
    return await start_app(models=(MLP_REF,), execution="executor", instances=1)


@pytest.fixture
async def executor_stub(executor_app: App) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with channel_to(executor_app) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


async def statistics(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str = MLP
) -> pb.ModelStatistics:
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=TIMEOUT)
    (entry,) = reply.model_stats
    return entry


def served_mlp(app: App) -> ServedModel:
    return app.models.get(MLP)


async def plug_with_one_request(
    app: App,
    stub: pb_grpc.GRPCInferenceServiceStub,
    plugs: Callable[[ServedModel], ExecutorPlug],
    rows: np.ndarray,
) -> tuple[ExecutorPlug, grpc.aio.UnaryUnaryCall]:
    """Hold the executor, then send one request whose batch takes the only instance slot:
    everything sent afterwards waits in the queue until the plug is released."""
    served = served_mlp(app)
    plug = plugs(served)
    first = stub.ModelInfer(infer_request(rows, MLP, id="plug"), timeout=TIMEOUT)
    await eventually(
        lambda: served.batcher.in_flight == 1,
        timeout=TIMEOUT,
        what="the plug request's batch to start",
    )
    return plug, first


# ---- batching -----------------------------------------------------------------------------


async def test_64_concurrent_callers_are_batched_and_each_gets_its_own_rows_in_order(
    executor_app: App,
    executor_stub: pb_grpc.GRPCInferenceServiceStub,
    holdout: Holdout,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    slices = []
    start = 0
    for i in range(64):
        n = 1 + i % 3
        slices.append(holdout.X[start : start + n])
        start += n

    responses = await asyncio.gather(
        *(
            executor_stub.ModelInfer(infer_request(rows, MLP, id=f"r{i}"), timeout=TIMEOUT)
            for i, rows in enumerate(slices)
        )
    )

    for i, (rows, response) in enumerate(zip(slices, responses, strict=True)):
        assert response.id == f"r{i}"
        assert_rows_match(response, reference(rows))
    stats = await statistics(executor_stub)
    assert stats.inference_count == start
    assert stats.execution_count < 64
    assert max(b.batch_size for b in stats.batch_stats) > 1


async def test_requests_with_different_row_counts_share_one_batch_and_are_split_back(
    executor_app: App,
    executor_stub: pb_grpc.GRPCInferenceServiceStub,
    holdout: Holdout,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    plugs: Callable[[ServedModel], ExecutorPlug],
) -> None:
    served = served_mlp(executor_app)
    plug, first = await plug_with_one_request(
        executor_app, executor_stub, plugs, holdout.X[100:101]
    )
    counts = [1, 5, 2, 7, 3]
    slices, start = [], 200
    for n in counts:
        slices.append(holdout.X[start : start + n])
        start += n
    calls = [executor_stub.ModelInfer(infer_request(rows, MLP), timeout=TIMEOUT) for rows in slices]
    await eventually(
        lambda: served.batcher.queued_rows == sum(counts),
        timeout=TIMEOUT,
        what="all rows to be queued",
    )

    plug.release()
    responses = await asyncio.gather(*calls)

    await first
    for rows, response in zip(slices, responses, strict=True):
        assert_rows_match(response, reference(rows))
    stats = await statistics(executor_stub)
    assert sum(counts) in {b.batch_size for b in stats.batch_stats}
    assert stats.execution_count == 2


# ---- versions and names ---------------------------------------------------------------------


async def test_explicit_model_version_1_is_served(
    stub: pb_grpc.GRPCInferenceServiceStub, holdout: Holdout
) -> None:
    response = await stub.ModelInfer(
        infer_request(holdout.X[:2], MLP, version="1"), timeout=TIMEOUT
    )

    assert (response.model_name, response.model_version) == (MLP, "1")
    assert outputs_of(response)["probabilities"].shape == (2, 2)


async def test_unknown_model_version_is_not_found_and_named(
    stub: pb_grpc.GRPCInferenceServiceStub, holdout: Holdout
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(infer_request(holdout.X[:1], MLP, version="42"), timeout=TIMEOUT)

    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'42'" in (err.value.details() or "")


async def test_unknown_model_is_not_found_and_named(
    stub: pb_grpc.GRPCInferenceServiceStub, holdout: Holdout
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(infer_request(holdout.X[:1], model="no_such_model"), timeout=TIMEOUT)

    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in (err.value.details() or "")


async def test_request_over_max_batch_size_is_invalid_argument_naming_max_batch_size(
    start_app: AppFactory, holdout: Holdout
) -> None:
    app = await start_app(models=(MLP_REF,), max_batch_size=8)
    async with channel_to(app) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(infer_request(holdout.X[:9], MLP), timeout=TIMEOUT)

        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_batch_size" in (err.value.details() or "")


# ---- load shedding, deadlines, cancellation -------------------------------------------------


async def test_full_queue_answers_resource_exhausted_at_once_and_accepted_requests_succeed(
    start_app: AppFactory,
    holdout: Holdout,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    plugs: Callable[[ServedModel], ExecutorPlug],
) -> None:
    app = await start_app(
        models=(MLP_REF,), execution="executor", instances=1, max_batch_size=4, max_queue_size=4
    )
    served = served_mlp(app)
    async with channel_to(app) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        plug, first = await plug_with_one_request(app, stub, plugs, holdout.X[:1])
        flood = [holdout.X[10 + i : 11 + i] for i in range(20)]
        calls = [stub.ModelInfer(infer_request(rows, MLP), timeout=TIMEOUT) for rows in flood]

        # The 16 that do not fit are answered while the model is still held: nobody waited.
        await eventually(
            lambda: sum(c.done() for c in calls) == 16, timeout=TIMEOUT, what="16 rejections"
        )
        assert served.batcher.queued_rows == 4
        for call in calls:
            if call.done():
                assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "full" in (await call.details())

        plug.release()
        await first
        await eventually(
            lambda: all(c.done() for c in calls), timeout=TIMEOUT, what="every call to be answered"
        )
        accepted = [
            (rows, call)
            for rows, call in zip(flood, calls, strict=True)
            if await call.code() == grpc.StatusCode.OK
        ]
        assert len(accepted) == 4
        for rows, call in accepted:
            assert_rows_match(await call, reference(rows))


async def test_request_whose_deadline_passes_in_the_queue_gets_deadline_exceeded_and_never_runs(
    executor_app: App,
    executor_stub: pb_grpc.GRPCInferenceServiceStub,
    holdout: Holdout,
    plugs: Callable[[ServedModel], ExecutorPlug],
) -> None:
    served = served_mlp(executor_app)
    plug, first = await plug_with_one_request(executor_app, executor_stub, plugs, holdout.X[:1])

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await executor_stub.ModelInfer(infer_request(holdout.X[1:6], MLP), timeout=0.2)

    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(
        lambda: served.batcher.queued_rows == 0,
        timeout=TIMEOUT,
        what="the expired request to leave the queue",
    )
    plug.release()
    await first
    after = await executor_stub.ModelInfer(infer_request(holdout.X[6:8], MLP), timeout=TIMEOUT)
    assert outputs_of(after)["label"].shape == (2,)
    stats = await statistics(executor_stub)
    assert (
        stats.inference_count == 1 + 2
    )  # the plug's row and the later request's, not the 5 expired


async def test_cancelling_one_caller_leaves_its_batch_mates_correct_and_the_server_idle(
    executor_app: App,
    executor_stub: pb_grpc.GRPCInferenceServiceStub,
    holdout: Holdout,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    plugs: Callable[[ServedModel], ExecutorPlug],
) -> None:
    served = served_mlp(executor_app)
    plug, first = await plug_with_one_request(executor_app, executor_stub, plugs, holdout.X[:1])
    slices = [holdout.X[20:22], holdout.X[30:33], holdout.X[40:41]]
    calls = [executor_stub.ModelInfer(infer_request(rows, MLP), timeout=TIMEOUT) for rows in slices]
    await eventually(
        lambda: served.batcher.queued_rows == 6, timeout=TIMEOUT, what="three callers queued"
    )

    calls[1].cancel()
    await eventually(
        lambda: served.batcher.queued_rows == 3,
        timeout=TIMEOUT,
        what="the server to drop the cancelled rows",
    )
    plug.release()

    with pytest.raises(asyncio.CancelledError):
        await calls[1]
    assert_rows_match(await calls[0], reference(slices[0]))
    assert_rows_match(await calls[2], reference(slices[2]))
    await first
    await eventually(
        lambda: (
            (executor_app.pipeline.in_flight, served.batcher.queued_rows, served.batcher.in_flight)
            == (0, 0, 0)
        ),
        timeout=TIMEOUT,
        what="queue and in-flight to return to 0",
    )
    stats = await statistics(executor_stub)
    assert stats.inference_count == 1 + 2 + 1


# ---- streaming ------------------------------------------------------------------------------


async def test_stream_answers_every_request_by_id_and_survives_a_bad_one(
    stub: pb_grpc.GRPCInferenceServiceStub,
    holdout: Holdout,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    call = stub.ModelStreamInfer(timeout=TIMEOUT)
    sent = {f"good-{i}": holdout.X[50 + 3 * i : 52 + 3 * i] for i in range(6)}
    for request_id, rows in sent.items():
        await call.write(infer_request(rows, MLP, id=request_id))
    bad = infer_request(holdout.X[:1], MLP, id="bad")
    bad.inputs[0].datatype = "FP64"
    await call.write(bad)

    replies: dict[str, pb.ModelStreamInferResponse] = {}
    while len(replies) < len(sent) + 1:
        reply = await call.read()
        assert reply is not grpc.aio.EOF
        replies[reply.infer_response.id] = reply
    # The stream is still open after the error: one more request, one more answer.
    await call.write(infer_request(holdout.X[90:91], MLP, id="after"))
    after = await call.read()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK

    assert "INVALID_ARGUMENT" in replies["bad"].error_message
    assert "FP64" in replies["bad"].error_message
    for request_id, rows in sent.items():
        assert replies[request_id].error_message == ""
        assert_rows_match(replies[request_id].infer_response, reference(rows))
    assert after.error_message == ""
    assert after.infer_response.id == "after"


# ---- health and metrics ---------------------------------------------------------------------


async def test_grpc_health_check_reports_serving(app: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        service = await health.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=TIMEOUT
        )

    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert service.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_endpoint_counts_requests_by_status_and_batch_sizes_after_traffic(
    app: App, stub: pb_grpc.GRPCInferenceServiceStub, holdout: Holdout
) -> None:
    await asyncio.gather(
        *(
            stub.ModelInfer(infer_request(holdout.X[i : i + 2], MLP), timeout=TIMEOUT)
            for i in range(5)
        )
    )
    bad = infer_request(holdout.X[:1], MLP)
    bad.inputs[0].shape[:] = [1, 14]
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelInfer(bad, timeout=TIMEOUT)

    samples = await scrape_async(app.metrics_port)
    requests = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "batchline_requests_total"
    }
    ok = (("model", MLP), ("protocol", "grpc"), ("status", "OK"), ("version", "1"))
    invalid = (
        ("model", MLP),
        ("protocol", "grpc"),
        ("status", "INVALID_ARGUMENT"),
        ("version", "1"),
    )
    assert requests[ok] == 5
    assert requests[invalid] == 1
    assert samples[("batchline_batch_size_rows_sum", (("model", MLP), ("version", "1")))] == 10
    assert samples[("batchline_batch_size_rows_count", (("model", MLP), ("version", "1")))] >= 1


async def test_model_config_advertises_the_entity_key_of_an_entity_keyed_model(
    stub: pb_grpc.GRPCInferenceServiceStub, demo_registry: Path
) -> None:
    import json

    view = json.loads((demo_registry / "churn" / "1" / "feature_view.json").read_text())
    config = (await stub.ModelConfig(pb.ModelConfigRequest(name="churn"))).config
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["entity_key"] == view["entity_key"] == "customer_id"
    assert (params["entity_key_datatype"], params["entity_key_shape"]) == ("BYTES", "[-1]")
    assert params["feature_input"] == "input"
    assert params["feature_view"] == view["name"]


async def test_features_sent_with_entity_ids_are_what_the_model_gets(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    """A client filling both the feature input and the entity key (no feature store here):
    the features are used, the ids only travel along; the answer equals features alone."""
    import struct

    rows = np.random.default_rng(5).normal(size=(3, 15)).astype(np.float32)
    both = pb.ModelInferRequest(model_name="churn", id="both")
    both.inputs.add(name="input", datatype="FP32", shape=[3, 15])
    both.inputs.add(name="customer_id", datatype="BYTES", shape=[3])
    both.raw_input_contents.append(rows.tobytes())
    both.raw_input_contents.append(
        b"".join(struct.pack("<I", len(i)) + i for i in (b"c0", b"nobody", b"c8"))
    )
    alone = pb.ModelInferRequest(model_name="churn", id="alone")
    alone.inputs.add(name="input", datatype="FP32", shape=[3, 15])
    alone.raw_input_contents.append(rows.tobytes())
    with_ids, without = await stub.ModelInfer(both), await stub.ModelInfer(alone)
    assert list(with_ids.raw_output_contents) == list(without.raw_output_contents)
    assert "defaulted_rows" not in with_ids.parameters
    mismatch = pb.ModelInferRequest()
    mismatch.CopyFrom(both)
    mismatch.inputs[1].shape[:] = [2]
    mismatch.raw_input_contents[1] = b"".join(struct.pack("<I", 2) + b"c0" for _ in range(2))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ModelInfer(mismatch)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rows" in (refused.value.details() or "")
