"""The CallAcceptor on a real server: grpc.aio's private entry points it drives exist in the
installed grpcio (so an upgrade that moves them fails here, not silently in production), calls
it accepts and runs itself behave like grpc.aio's own (replies, statuses, deadlines, a client's
cancel, a message that does not parse, a handler that fails), it stays off when
max_concurrent_rpcs is grpc.aio's to count, and the server stops cleanly with it on."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.api import acceptor
from server.app import App
from tests.support.apps import AppFactory
from tests.support.models import rows
from tests.support.polling import eventually

TIMEOUT = 30.0
# The acceptor is grpc.aio's: these servers run on the grpcio transport whatever the default.
GRPCIO = {"grpc_transport": "grpcio"}
# A lone 1-row call waits for the preferred batch of 8: eight calls held in flight together.
HOLD = {"preferred_batch_sizes": (8,), "max_queue_delay_us": 3_000_000}
# Not a ModelInferRequest: field 1 (model_name) with a length past the end of the message.
UNPARSABLE = b"\x0a\xff\xff\xff"


def _request(n: int = 1, model: str = "churn") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[n, 15])
    request.raw_input_contents.append(rows(n, False).tobytes())
    return request


def test_the_installed_grpcio_has_the_internals_the_acceptor_drives() -> None:
    assert acceptor.supported(), f"grpcio {grpc.__version__}: cygrpc internals moved"


async def test_calls_it_accepts_are_answered_like_any_other(start_app: AppFactory) -> None:
    """Eight calls sent at once reach gRPC core together: grpc.aio's own loop holds one request
    for a new call, so the acceptor takes the others; every one is answered with its rows."""
    app = await start_app(models=("churn@production",), server=GRPCIO, **HOLD)
    accept = app._server.acceptor
    assert accept is not None
    assert accept.active
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = await asyncio.gather(
            *(stub.ModelInfer(_request(), timeout=TIMEOUT) for _ in range(8))
        )
        assert [list(r.outputs[1].shape) for r in replies] == [[1, 2]] * 8
        assert accept.accepted >= 1
        # Errors keep their status through the acceptor's calls.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(_request(model="nope"), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # A call the acceptor runs honours the caller's deadline (held: no batch of 8 comes).
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.ModelInfer(_request(), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = (await _stub_stats(app.grpc_port)).model_stats[0]
    assert stats.inference_stats.success.count == 8
    assert app._server.calls_in_flight() == 0


async def _stub_stats(port: int) -> pb.ModelStatisticsResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply: pb.ModelStatisticsResponse = await stub.ModelStatistics(
            pb.ModelStatisticsRequest(name="churn"), timeout=TIMEOUT
        )
        return reply


async def test_max_concurrent_rpcs_leaves_accepting_to_grpc_aio(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",), server={**GRPCIO, "max_concurrent_rpcs": 4})
    assert app._server.acceptor is None
    assert app._server.calls_in_flight() == 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _request(), timeout=TIMEOUT
        )
    assert np.frombuffer(reply.raw_output_contents[1], dtype=np.float32).shape == (2,)


async def test_stop_withdraws_every_outstanding_request(start_app: AppFactory) -> None:
    app = await start_app(models=("churn@production",), server=GRPCIO)
    accept = app._server.acceptor
    assert accept is not None
    assert len(accept._pending) == acceptor.DEFAULT_DEPTH * 2  # ModelInfer, ModelStreamInfer
    await app.stop()
    assert not accept._pending
    assert not accept.active


async def _through_the_acceptor(app: App, stub: pb_grpc.GRPCInferenceServiceStub) -> int:
    """Let grpc.aio's own accept loop take one call (core hands the first call to the request
    it made at start), so the calls that follow reach the acceptor's; its count so far. Eight
    rows: a preferred batch of its own where one is set (HOLD)."""
    await stub.ModelInfer(_request(8), timeout=TIMEOUT)
    accept = app._server.acceptor
    assert accept is not None
    accepted: int = accept.accepted
    return accepted


async def test_a_cancelled_call_leaves_the_queue_before_its_batch_runs(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server=GRPCIO, **HOLD)
    served = app.models.get("churn")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = await _through_the_acceptor(app, stub)
        kept = stub.ModelInfer(_request(2), timeout=TIMEOUT)
        gone = stub.ModelInfer(_request(3), timeout=TIMEOUT)
        await eventually(lambda: served.batcher.queued_rows == 5, timeout=TIMEOUT, what="5 rows")
        assert app._server.acceptor.accepted == before + 2
        # Held past WATCH_AFTER_S, each has a watcher for its caller's cancel.
        await eventually(
            lambda: app._server.acceptor.watched >= 2, timeout=TIMEOUT, what="2 watchers"
        )
        gone.cancel()
        await eventually(
            lambda: served.batcher.queued_rows == 2, timeout=TIMEOUT, what="the cancel to count"
        )
        # Six more rows complete the preferred batch of 8: it runs without the cancelled three.
        rest = [stub.ModelInfer(_request(3), timeout=TIMEOUT) for _ in range(2)]
        replies = await asyncio.gather(kept, *rest)
        assert [list(r.outputs[1].shape) for r in replies] == [[2, 2], [3, 2], [3, 2]]
        with pytest.raises(asyncio.CancelledError):
            await gone
    stats = (await _stub_stats(app.grpc_port)).model_stats[0]
    assert stats.inference_stats.success.count == 1 + 3
    assert stats.inference_count == 8 + 8  # the warm-up's batch of 8, then 2 + 3 + 3
    await eventually(lambda: app._server.calls_in_flight() == 0, timeout=TIMEOUT, what="idle")


async def test_a_message_that_does_not_parse_is_refused_and_the_next_call_is_served(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server=GRPCIO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = await _through_the_acceptor(app, stub)
        raw = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(UNPARSABLE, timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in (caught.value.details() or "")
        reply = await stub.ModelInfer(_request(), timeout=TIMEOUT)
        assert list(reply.outputs[1].shape) == [1, 2]
        assert app._server.acceptor.accepted == before + 2


async def test_a_handler_that_fails_answers_unknown_and_the_server_goes_on(
    start_app: AppFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a handler (here one injected into the data plane) is logged with its traceback
    and answered UNKNOWN, as grpc.aio answers it; the call after it is served."""
    app = await start_app(models=("churn@production",), server=GRPCIO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = await _through_the_acceptor(app, stub)
        real = app.plane.infer

        async def broken(*args: object) -> object:
            raise RuntimeError("injected")

        monkeypatch.setattr(app.plane, "infer", broken)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(_request(), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN
        assert "injected" in (caught.value.details() or "")
        assert any("unexpected RuntimeError" in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(app.plane, "infer", real)
        reply = await stub.ModelInfer(_request(), timeout=TIMEOUT)
        assert list(reply.outputs[1].shape) == [1, 2]
        assert app._server.acceptor.accepted == before + 2


# ---- ModelStreamInfer through the acceptor --------------------------------------------------


async def _stream_through_the_acceptor(app: App, stub: pb_grpc.GRPCInferenceServiceStub) -> int:
    """One stream for grpc.aio's own accept loop (it holds the first request for a new call),
    so the next stream reaches the acceptor's; its count so far."""
    warm = stub.ModelStreamInfer(timeout=TIMEOUT)
    await warm.write(_request(8))
    assert (await warm.read()).error_message == ""
    await warm.done_writing()
    assert await warm.read() is grpc.aio.EOF
    accept = app._server.acceptor
    assert accept is not None
    accepted: int = accept.accepted
    return accepted


def _stream_request(n: int, request_id: str) -> pb.ModelInferRequest:
    request = _request(n)
    request.id = request_id
    return request


async def test_a_stream_it_runs_answers_each_request_by_id_and_survives_a_bad_one(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server=GRPCIO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = await _stream_through_the_acceptor(app, stub)
        call = stub.ModelStreamInfer(timeout=TIMEOUT)
        # Open and idle, a stream is not a gRPC call waiting (the REST turn budget reads this).
        await eventually(
            lambda: app._server.acceptor.accepted == before + 1, timeout=TIMEOUT, what="accepted"
        )
        assert app._server.calls_in_flight() == 0
        for i in range(1, 6):
            await call.write(_stream_request(i, f"r{i}"))
        bad = _stream_request(1, "bad")
        bad.inputs[0].shape[:] = [1, 14]
        await call.write(bad)
        replies = {}
        while len(replies) < 6:
            reply = await call.read()
            assert reply is not grpc.aio.EOF
            replies[reply.infer_response.id] = reply
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert app._server.acceptor.accepted == before + 1
    for i in range(1, 6):
        assert replies[f"r{i}"].error_message == ""
        assert list(replies[f"r{i}"].infer_response.outputs[1].shape) == [i, 2]
    assert replies["bad"].error_message.startswith("INVALID_ARGUMENT")


async def test_a_stream_message_that_does_not_parse_ends_the_stream_invalid_argument(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server=GRPCIO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = await _stream_through_the_acceptor(app, stub)
        raw = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=None,
        )
        call = raw(timeout=TIMEOUT)
        await call.write(UNPARSABLE)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in (caught.value.details() or "")
        assert app._server.acceptor.accepted == before + 1


async def test_a_cancelled_stream_drops_its_queued_requests_and_the_server_goes_idle(
    start_app: AppFactory,
) -> None:
    app = await start_app(models=("churn@production",), server=GRPCIO, **HOLD)
    served = app.models.get("churn")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = await _stream_through_the_acceptor(app, stub)
        call = stub.ModelStreamInfer(timeout=TIMEOUT)
        await call.write(_stream_request(2, "a"))
        await call.write(_stream_request(3, "b"))
        await eventually(lambda: served.batcher.queued_rows == 5, timeout=TIMEOUT, what="5 rows")
        assert app._server.acceptor.accepted == before + 1
        call.cancel()
        await eventually(
            lambda: (served.batcher.queued_rows, app.pipeline.in_flight) == (0, 0),
            timeout=TIMEOUT,
            what="the cancelled stream's requests to leave the queue",
        )
        await eventually(lambda: app._server.calls_in_flight() == 0, timeout=TIMEOUT, what="idle")
    stats = (await _stub_stats(app.grpc_port)).model_stats[0]
    assert stats.inference_count == 8  # the warm-up stream's batch only: none of the 5 ran
