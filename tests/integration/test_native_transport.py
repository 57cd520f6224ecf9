"""The native transport (server/api/h2) against grpc.aio's own server as the reference: the
same handlers registered on both, the same grpcio client calls, the same outcome expected
(status, details, messages). Plus what only the native transport has to prove about itself:
replies bigger than a frame with the client's default settings, connection age, and the
floods a hostile client can send (rapid reset, SETTINGS)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from server.api.h2.server import NativeServer

TIMEOUT = 20.0
SERVICE = "test.Echo"
MAX_MESSAGE = 8 << 20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def raw_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """RFC 9113 4.1, written by hand."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload  # fmt: skip


def request_block(path: bytes) -> bytes:
    """RFC 7541 by hand: :method POST (static 3), :scheme http (static 6), :path and
    content-type as literals without indexing on static names 4 and 31."""
    return (
        b"\x83\x86"
        + b"\x04" + bytes((len(path),)) + path
        + b"\x0f\x10" + bytes((16,)) + b"application/grpc"
    )  # fmt: skip


# ---- handlers: bytes in, bytes out (no serializers), the same on both servers ---------------


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def big(request: bytes, context: Any) -> bytes:
    return b"x" * int(request.decode())


async def set_code_and_return(request: bytes, context: Any) -> bytes:
    context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    context.set_details("not now")
    return b"ignored"


async def set_code_and_raise(request: bytes, context: Any) -> bytes:
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    context.set_details("Method not implemented!")
    raise NotImplementedError()


async def abort_with_metadata(request: bytes, context: Any) -> bytes:
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED, "no: ünïcode", (("why", "policy"), ("blob-bin", b"\x00\xff"))
    )  # fmt: skip
    raise AssertionError("unreachable")


async def metadata_echo(request: bytes, context: Any) -> bytes:
    wanted = dict(context.invocation_metadata())
    await context.send_initial_metadata((("seen", wanted.get("who", "")),))
    context.set_trailing_metadata((("bin-bin", wanted.get("raw-bin", b"")),))
    return b"ok"


async def count_up(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for i in range(int(request.decode())):
        yield str(i).encode()


def count_sync(request: bytes, context: Any) -> Iterator[bytes]:
    for i in range(int(request.decode())):
        yield str(i).encode()


async def total(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return str(sum([len(r) async for r in requests])).encode()


async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r.upper()


async def slow(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(float(request.decode()))
    return b"late"


HANDLERS = {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Big": grpc.unary_unary_rpc_method_handler(big),
    "SetCodeReturn": grpc.unary_unary_rpc_method_handler(set_code_and_return),
    "SetCodeRaise": grpc.unary_unary_rpc_method_handler(set_code_and_raise),
    "Abort": grpc.unary_unary_rpc_method_handler(abort_with_metadata),
    "Metadata": grpc.unary_unary_rpc_method_handler(metadata_echo),
    "CountUp": grpc.unary_stream_rpc_method_handler(count_up),
    "CountSync": grpc.unary_stream_rpc_method_handler(count_sync),
    "Total": grpc.stream_unary_rpc_method_handler(total),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
}


async def start(kind: str, **options: Any) -> tuple[Any, int]:
    generic = grpc.method_handlers_generic_handler(SERVICE, HANDLERS)
    server: Any
    if kind == "native":
        server = NativeServer(max_message_bytes=MAX_MESSAGE, **options)
        server.add_generic_rpc_handlers((generic,))
        port = server.add_port("127.0.0.1", 0, reuse_port=False)
    else:
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.aio.server(
            ThreadPoolExecutor(2),  # grpc.aio runs plain generators there
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        server.add_generic_rpc_handlers((generic,))
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture(params=["native", "grpcio"])
async def port(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    server, bound = await start(request.param)
    yield bound
    await server.stop(0.5)


@pytest.fixture
async def channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened


def unary(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{name}")


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


async def test_unary_replies_of_every_size_with_the_clients_default_settings(
    channel: grpc.aio.Channel,
) -> None:
    """grpcio advertises 4 MiB frames and windows: replies above 64 KiB leave in several
    DATA frames; 4 MB (under the client's 4 MiB receive limit) crosses its window too."""
    for size in (0, 1, 16_384, 70_000, 1 << 20, 4_000_000):
        reply = await unary(channel, "Big")(str(size).encode(), timeout=TIMEOUT)
        assert reply == b"x" * size, size
    assert await unary(channel, "Echo")(b"\x00" * (3 << 20), timeout=TIMEOUT) == b"\x00" * (3 << 20)


async def test_a_code_the_handler_set_wins_over_its_reply_and_its_exception(
    channel: grpc.aio.Channel,
) -> None:
    assert await status_of(unary(channel, "SetCodeReturn")(b"", timeout=TIMEOUT)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "not now",
    )
    # The generated servicer stubs' set_code(UNIMPLEMENTED) + raise. (The details differ:
    # grpc.aio names the exception, the native transport keeps the ones the handler set.)
    code, _ = await status_of(unary(channel, "SetCodeRaise")(b"", timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNIMPLEMENTED


async def test_abort_carries_its_details_and_trailing_metadata(channel: grpc.aio.Channel) -> None:
    call = unary(channel, "Abort")(b"", timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "no: ünïcode"
    trailing = dict(caught.value.trailing_metadata() or ())
    assert trailing["why"] == "policy"
    assert trailing["blob-bin"] == b"\x00\xff"


async def test_metadata_travels_both_ways(channel: grpc.aio.Channel) -> None:
    call = unary(channel, "Metadata")(
        b"", metadata=(("who", "me"), ("raw-bin", b"\x01\x02\x03")), timeout=TIMEOUT
    )
    assert await call == b"ok"
    assert dict(await call.initial_metadata())["seen"] == "me"
    assert dict(await call.trailing_metadata())["bin-bin"] == b"\x01\x02\x03"


async def test_streaming_kinds(channel: grpc.aio.Channel) -> None:
    counted = [r async for r in channel.unary_stream(f"/{SERVICE}/CountUp")(b"50", timeout=TIMEOUT)]
    assert counted == [str(i).encode() for i in range(50)]
    plain = [r async for r in channel.unary_stream(f"/{SERVICE}/CountSync")(b"5", timeout=TIMEOUT)]
    assert plain == [str(i).encode() for i in range(5)]
    summed = await channel.stream_unary(f"/{SERVICE}/Total")(
        iter([b"ab", b"cde", b""]), timeout=TIMEOUT
    )
    assert summed == b"5"
    chatted = [
        r
        async for r in channel.stream_stream(f"/{SERVICE}/Chat")(
            iter([b"a", b"b" * 100_000, b"c"]), timeout=TIMEOUT
        )
    ]
    assert chatted == [b"A", b"B" * 100_000, b"C"]


async def test_deadline_and_unknown_method(channel: grpc.aio.Channel) -> None:
    code, _ = await status_of(unary(channel, "Slow")(b"5", timeout=0.2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    code, _ = await status_of(unary(channel, "Nope")(b"", timeout=TIMEOUT))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    code, details = await status_of(
        unary(channel, "Echo")(b"\x00" * (MAX_MESSAGE + 1), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


async def test_connections_past_their_age_are_replaced_without_failing_a_call() -> None:
    server, bound = await start("native", max_connection_age_s=0.3, max_connection_age_grace_s=5)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as opened:
            echoing = unary(opened, "Echo")
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.5
            calls = 0
            while loop.time() < until:
                assert await echoing(b"hi", timeout=TIMEOUT) == b"hi"
                calls += 1
        assert server.accepted >= 3, "connections were not replaced"
        assert calls > 10
    finally:
        await server.stop(0.5)


async def goaway_code(bound: int, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", bound)
    try:
        writer.write(data)
        received = b""
        while chunk := await asyncio.wait_for(reader.read(65536), timeout=TIMEOUT):
            received += chunk
    finally:
        writer.close()
    pos, codes = 0, []
    while len(received) - pos >= 9:
        length = int.from_bytes(received[pos : pos + 3], "big")
        if received[pos + 3] == 0x7:
            codes.append(int.from_bytes(received[pos + 13 : pos + 17], "big"))
        pos += 9 + length
    assert codes, "no GOAWAY"
    return codes[-1]


async def test_rapid_reset_and_settings_floods_end_the_connection_enhance_your_calm() -> None:
    server, bound = await start("native")
    try:
        block = request_block(f"/{SERVICE}/Slow".encode())
        resets = b"".join(
            raw_frame(0x1, 0x4, sid, block) + raw_frame(0x3, 0, sid, struct.pack(">I", 8))
            for sid in range(1, 2 * 2100, 2)
        )
        assert await goaway_code(bound, PREFACE + raw_frame(0x4, 0, 0) + resets) == 0xB
        flood = raw_frame(0x4, 0, 0) * 1100
        assert await goaway_code(bound, PREFACE + flood) == 0xB
        assert server.calls == 0, "every reset call was let go"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as opened:
            assert await unary(opened, "Echo")(b"still", timeout=TIMEOUT) == b"still"
    finally:
        await server.stop(0.5)


async def test_many_large_requests_at_once_all_complete() -> None:
    """31 MB of requests in flight on one connection, past what it may hold for handlers
    (16 MiB here): windows are held back for all but the oldest waiting stream, so messages
    keep completing and none stalls."""
    server, bound = await start("native")
    try:
        assert max(2 * MAX_MESSAGE, 16 << 20) < 8 * 3_900_000
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as opened:
            echoing = unary(opened, "Echo")
            bodies = [bytes((i,)) * 3_900_000 for i in range(8)]
            replies = await asyncio.gather(*(echoing(b, timeout=TIMEOUT) for b in bodies))
        assert replies == bodies
        assert all(conn.held == 0 for conn in server.connections)
    finally:
        await server.stop(0.5)
