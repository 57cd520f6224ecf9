"""The native gRPC transport (`[server] grpc_transport = "native"`, server/api/h2) on a real
server: grpcio clients get what grpc.aio's server gives them (replies, statuses, deadlines,
cancels, big messages both ways through flow control, compression, health, reflection; each
of those tests runs on both transports), and a hostile peer speaking broken HTTP/2 loses its
own connection, never the server's.

Broken frames are written by hand from RFC 9113's layout (not with the transport's own
helpers), and the server's answers are parsed the same way."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from registry_client import FileRegistry
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App
from tests.support.apps import AppFactory
from tests.support.models import rows
from tests.support.polling import eventually
from tests.support.requests import infer_request, outputs_of

TIMEOUT = 30.0
NATIVE = {"grpc_transport": "native"}
# A lone 1-row call waits for the preferred batch of 8 (held in the queue for 3 s).
HOLD = {"preferred_batch_sizes": (8,), "max_queue_delay_us": 3_000_000}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY, SETTINGS, HEADERS, DATA = 0x7, 0x4, 0x1, 0x0
PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 0x1, 0x6, 0x9


def raw_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """RFC 9113 4.1: 24-bit length, type, flags, reserved bit + 31-bit stream id."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, pos = [], 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


async def goaway_code(port: int, *chunks: bytes) -> int:
    """Send `chunks` on a fresh connection, read until the server closes it; its GOAWAY's
    error code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        received = b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout=TIMEOUT)
            if not data:
                break
            received += data
    finally:
        writer.close()
    goaways = [f for f in parse_frames(received) if f[0] == GOAWAY]
    assert goaways, f"no GOAWAY in {parse_frames(received)}"
    return int.from_bytes(goaways[-1][3][4:8], "big")


def grpc_message(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


class H2Client:
    """A hand-driven HTTP/2 client (the h2 library's state machine over an asyncio stream),
    for what grpcio clients never do on purpose: a call left open, a reset mid-call."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self.flush()

    @classmethod
    async def open(cls, port: int) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def call(self, path: str, message: bytes, *, timeout: str = "", end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        if timeout:
            headers.append(("grpc-timeout", timeout))
        self.conn.send_headers(sid, headers)
        self.conn.send_data(sid, grpc_message(message), end_stream=end)
        self.flush()
        return sid

    async def until_ended(self, sid: int) -> dict[str, str]:
        """Read until stream `sid` ends; its trailers (or trailers-only headers)."""
        trailers: dict[str, str] = {}
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), timeout=TIMEOUT)
            assert data, "the server closed the connection"
            for event in self.conn.receive_data(data):
                ours = getattr(event, "stream_id", None) == sid
                if ours and isinstance(
                    event, h2.events.TrailersReceived | h2.events.ResponseReceived
                ):
                    trailers.update(dict(event.headers))  # type: ignore[arg-type]
                if ours and isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.flush()
                    return trailers
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            self.flush()

    async def close(self) -> None:
        self.writer.close()


@pytest.fixture(params=["native", "grpcio"])
def transport(request: pytest.FixtureRequest) -> dict[str, str]:
    """What grpcio clients see must not depend on the transport: those tests run on both."""
    return {"grpc_transport": request.param}


@pytest.fixture
async def served(start_app: AppFactory, transport: dict[str, str]) -> App:
    return await start_app(models=("churn@production",), server=transport)


@pytest.fixture
async def native(start_app: AppFactory) -> App:
    return await start_app(models=("churn@production",), server=NATIVE)


@pytest.fixture
async def stub(served: App) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
async def native_stub(native: App) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{native.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def churn_session(demo_registry: object) -> ort.InferenceSession:
    registry = FileRegistry(demo_registry)  # type: ignore[arg-type]
    path = registry.fetch(registry.get_version("churn", "1"))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


async def test_replies_match_onnxruntime_unary_and_streamed(
    served: App, stub: pb_grpc.GRPCInferenceServiceStub, demo_registry: object
) -> None:
    x = rows(5, False)
    expected = churn_session(demo_registry).run(None, {"input": x})
    reply = await stub.ModelInfer(infer_request(x, id="one"), timeout=TIMEOUT)
    assert reply.id == "one"
    got = outputs_of(reply)
    np.testing.assert_array_equal(got["label"], expected[0])
    np.testing.assert_allclose(got["probabilities"], expected[1], rtol=1e-6)

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for i in range(20):
            yield infer_request(x[i % 5 : i % 5 + 1], id=f"s{i}")

    answers = {}
    async for answer in stub.ModelStreamInfer(requests(), timeout=TIMEOUT):
        assert not answer.error_message
        answers[answer.infer_response.id] = outputs_of(answer.infer_response)
    assert sorted(answers) == sorted(f"s{i}" for i in range(20))
    for i in range(20):
        np.testing.assert_array_equal(answers[f"s{i}"]["label"], expected[0][i % 5 : i % 5 + 1])


async def test_many_concurrent_calls_on_one_connection_each_get_their_own_reply(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    x = rows(300, False)
    replies = await asyncio.gather(
        *(
            stub.ModelInfer(infer_request(x[i : i + 1], id=str(i)), timeout=TIMEOUT)
            for i in range(300)
        )
    )
    assert [r.id for r in replies] == [str(i) for i in range(300)]


async def test_messages_larger_than_every_window_cross_both_ways(
    start_app: AppFactory, transport: dict[str, str], demo_registry: object
) -> None:
    """3 MB in (past the 1 MiB stream window we open, so it needs our WINDOW_UPDATEs) and
    0.6 MB out (past the 64 KiB a client allows before its own updates)."""
    app = await start_app(
        models=("churn@production",), server=transport, max_batch_size=50_000, max_queue_size=50_000
    )
    x = rows(50_000, False)
    expected = churn_session(demo_registry).run(None, {"input": x})
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{app.grpc_port}",
        options=[("grpc.http2.bdp_probe", 0)],  # keep the client's window at its default
    ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelInfer(infer_request(x), timeout=TIMEOUT)
    got = outputs_of(reply)
    np.testing.assert_array_equal(got["label"], expected[0])
    np.testing.assert_allclose(got["probabilities"], expected[1], rtol=1e-6)


async def test_statuses_name_what_is_wrong(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ModelInfer(infer_request(rows(1, False), model="nope"), timeout=TIMEOUT)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (missing.value.details() or "")

    bad = pb.ModelInferRequest(model_name="churn")
    bad.inputs.add(name="input", datatype="FP32", shape=[1, 14])
    bad.raw_input_contents.append(np.zeros(14, np.float32).tobytes())
    with pytest.raises(grpc.aio.AioRpcError) as shape:
        await stub.ModelInfer(bad, timeout=TIMEOUT)
    assert shape.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in (shape.value.details() or "")


async def test_unknown_methods_and_unparsable_messages(
    served: App, transport: dict[str, str]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        unknown = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unknown(b"", timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as garbled:
            await raw(b"\x0a\xff\xff\xff", timeout=TIMEOUT)
        if transport["grpc_transport"] == "native":
            assert garbled.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid message" in (garbled.value.details() or "")
        else:
            # grpcio: the acceptor's calls say INVALID_ARGUMENT; the one call in ~65 that
            # grpc.aio's own accept loop takes says UNKNOWN, naming the parse error.
            assert garbled.value.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.UNKNOWN,
            )


async def test_a_message_past_the_limit_is_refused_with_both_sizes(
    start_app: AppFactory, transport: dict[str, str]
) -> None:
    app = await start_app(
        models=("churn@production",), server={**transport, "max_message_bytes": 64 * 1024}
    )
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{app.grpc_port}", options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request(rows(2000, False)), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(64 * 1024) in (caught.value.details() or "")
        # The connection still serves the next call.
        reply = await stub.ModelInfer(infer_request(rows(1, False)), timeout=TIMEOUT)
        assert list(reply.outputs[1].shape) == [1, 2]


async def test_gzip_compressed_requests_are_read(served: App) -> None:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{served.grpc_port}", compression=grpc.Compression.Gzip
    ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelInfer(infer_request(rows(64, False)), timeout=TIMEOUT)
    assert list(reply.outputs[1].shape) == [64, 2]


async def test_the_server_ends_a_call_at_its_deadline_and_drops_its_rows(
    start_app: AppFactory, transport: dict[str, str]
) -> None:
    """A held call whose grpc-timeout passes is answered DEADLINE_EXCEEDED by the server
    itself (the hand-driven client has no timer) and leaves the batcher's queue."""
    app = await start_app(models=("churn@production",), server=transport, **HOLD)
    client = await H2Client.open(app.grpc_port)
    try:
        message = infer_request(rows(1, False)).SerializeToString()
        sid = client.call("/inference.GRPCInferenceService/ModelInfer", message, timeout="200m")
        trailers = await client.until_ended(sid)
        assert trailers.get("grpc-status") == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        await eventually(lambda: app.pipeline.in_flight == 0, timeout=TIMEOUT, what="drained")
    finally:
        await client.close()


async def test_a_reset_call_is_cancelled_and_the_connection_serves_on(
    start_app: AppFactory, transport: dict[str, str]
) -> None:
    app = await start_app(models=("churn@production",), server=transport, **HOLD)
    client = await H2Client.open(app.grpc_port)
    try:
        message = infer_request(rows(1, False)).SerializeToString()
        sid = client.call("/inference.GRPCInferenceService/ModelInfer", message)
        await eventually(lambda: app.pipeline.in_flight == 1, timeout=TIMEOUT, what="queued")
        client.conn.reset_stream(sid)
        client.flush()
        await eventually(lambda: app.pipeline.in_flight == 0, timeout=TIMEOUT, what="cancelled")
        # Same connection: a metadata call is answered.
        meta = pb.ModelMetadataRequest(name="churn").SerializeToString()
        other = client.call("/inference.GRPCInferenceService/ModelMetadata", meta)
        trailers = await client.until_ended(other)
        assert trailers.get("grpc-status") == "0"
    finally:
        await client.close()


async def test_health_check_watch_and_reflection(served: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = []
        async for answer in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
        ):
            listed = [s.name for s in answer.list_services_response.service]
        assert "inference.GRPCInferenceService" in listed


async def test_a_stop_lets_running_calls_finish(
    start_app: AppFactory, transport: dict[str, str]
) -> None:
    app = await start_app(
        models=("churn@production",),
        server=transport,
        preferred_batch_sizes=(8,),
        max_queue_delay_us=300_000,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = asyncio.ensure_future(
            stub.ModelInfer(infer_request(rows(1, False), id="held"), timeout=TIMEOUT)
        )
        await eventually(lambda: app.pipeline.in_flight == 1, timeout=TIMEOUT, what="queued")
        await app.stop(grace=5.0)
        reply = await call
        assert reply.id == "held"


@pytest.mark.parametrize(
    ("name", "chunks", "code"),
    [
        ("not HTTP/2", (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",), PROTOCOL_ERROR),
        (
            "frame above the 16 KiB maximum",
            (PREFACE, raw_frame(SETTINGS, 0, 0), raw_frame(DATA, 0, 1, b"\x00" * 20000)),
            FRAME_SIZE_ERROR,
        ),
        (
            "even stream id from a client",
            (PREFACE, raw_frame(SETTINGS, 0, 0), raw_frame(HEADERS, 0x5, 2, b"\x83")),
            PROTOCOL_ERROR,
        ),
        (
            "HPACK index past both tables",
            (PREFACE, raw_frame(SETTINGS, 0, 0), raw_frame(HEADERS, 0x5, 1, b"\xff\x7f")),
            COMPRESSION_ERROR,
        ),
        (
            "SETTINGS of 5 bytes",
            (PREFACE, raw_frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\x00")),
            FRAME_SIZE_ERROR,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_broken_http2_loses_its_connection_and_nothing_else(
    native: App,
    native_stub: pb_grpc.GRPCInferenceServiceStub,
    name: str,
    chunks: tuple[bytes, ...],
    code: int,
) -> None:
    assert await goaway_code(native.grpc_port, *chunks) == code, name
    reply = await native_stub.ModelInfer(infer_request(rows(1, False)), timeout=TIMEOUT)
    assert list(reply.outputs[1].shape) == [1, 2]
