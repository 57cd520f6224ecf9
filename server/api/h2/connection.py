"""One HTTP/2 connection of the native gRPC transport: frames in, calls started, frames out.

An `asyncio.Protocol`, so the event loop hands it whatever bytes one read returned; it parses
every whole frame in them, starts the calls they complete, and answers in one write at the
end of the read (replies produced later, by handlers, leave in one write per loop turn). No
thread is involved: grpc.aio's path has gRPC core's I/O threads and its completion-queue poller
between the socket and the loop, ~7 context switches per unary call on this project's
machine, which is most of what a Python gRPC server spends per call.

What it holds to (RFC 9113 and gRPC's PROTOCOL-HTTP2): the connection preface and SETTINGS
(acknowledged, applied: the peer's initial window, frame size); flow control both ways (the
peer's windows bound what it sends, ours are opened as data is consumed, and a peer that
overruns them loses the connection); header blocks across CONTINUATION frames, decoded in
order so the HPACK table stays in step (a block that changes nothing in it is remembered, so
the usual repeated request headers are decoded once); PING answered; RST_STREAM cancelling
the call; GOAWAY on stop, then streams finish and the connection closes; a protocol error
answered GOAWAY naming it. And gRPC's: `application/grpc` only (415 otherwise), POST only
(405), unknown method UNIMPLEMENTED, grpc-timeout as a deadline that cancels the handler and
answers DEADLINE_EXCEEDED, the message size limits both ways (RESOURCE_EXHAUSTED), gzip and
deflate request messages, metadata (`-bin` values base64) in and out.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any

import grpc
import hpack

from server.api.h2 import frames as f
from server.api.h2.calls import Inbox, ServicerContext, run_streaming, run_unary, unparsable

if TYPE_CHECKING:
    from server.api.h2.server import NativeServer

log = logging.getLogger(__name__)

# What a peer may send before we open its windows: per stream, and for the connection.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_STREAMS = 1024  # per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
MAX_HEADER_LIST = 64 * 1024
MAX_HEADER_BLOCK = 64 * 1024  # compressed, across CONTINUATION frames
# A connection that has not sent the HTTP/2 preface by then is closed (a client that connects
# and says nothing holds a socket and a file descriptor for nothing).
PREFACE_TIMEOUT_S = 10.0
_CACHE_ENTRIES = 256

_CODE = {code.value[0]: code for code in grpc.StatusCode}
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]

_STATUS_405 = b"\x08" + bytes((3,)) + b"405"  # :status (static name 8), literal value
_STATUS_415 = b"\x08" + bytes((3,)) + b"415"
_HEADER_FRAME = f.FRAME_HEADER
_PREFIX = f.MESSAGE_PREFIX


class ProtocolFault(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Request:
    """A request's header block, parsed: what the transport needs and the call's metadata."""

    __slots__ = ("content_type", "encoding", "metadata", "method", "path", "size", "timeout")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.method = self.path = self.content_type = self.timeout = self.encoding = b""
        metadata: list[tuple[str, Any]] = []
        size = 0
        for name, value in fields:
            size += len(name) + len(value) + 32
            if name[:1] == b":":
                if name == b":path":
                    self.path = value
                elif name == b":method":
                    self.method = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"grpc-timeout":
                self.timeout = value
            elif name == b"grpc-encoding":
                self.encoding = value
            elif name in (b"te", b"grpc-accept-encoding", b"accept-encoding"):
                continue
            else:
                key = name.decode("latin-1")
                if key.endswith("-bin"):
                    try:
                        metadata.append((key, f.decode_binary(value)))
                    except ValueError:
                        continue  # gRPC drops a binary value it cannot decode
                else:
                    metadata.append((key, value.decode("latin-1")))
        self.metadata = tuple(metadata)
        self.size = size


class Stream:
    """One call: its state on the wire and the handler's task."""

    __slots__ = (
        "buffer",
        "cancelled",
        "conn",
        "context",
        "deadline",
        "drained",
        "encoding",
        "finished",
        "handler",
        "headers_sent",
        "id",
        "inbox",
        "message",
        "metadata",
        "pending",
        "recv_unacked",
        "remote_closed",
        "send_window",
        "tail",
        "task",
        "timer",
    )

    def __init__(
        self, conn: Connection, sid: int, handler: grpc.RpcMethodHandler, request: Request
    ) -> None:
        self.conn = conn
        self.id = sid
        self.handler = handler
        self.metadata = request.metadata
        self.encoding = request.encoding
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.context: ServicerContext | None = None
        self.inbox: Inbox | None = None
        self.message: bytes | None = None
        self.buffer: bytearray | None = None
        self.recv_unacked = 0
        self.send_window = conn.peer_window
        self.headers_sent = False
        self.remote_closed = False
        self.finished = False  # the status is sent (or queued behind data), or the call reset
        self.cancelled = False
        self.pending: deque[memoryview] | None = None  # DATA waiting for window
        self.tail = b""  # the trailers (and reset) waiting behind pending DATA
        self.drained: asyncio.Future[None] | None = None

    # ---- what handlers send (through calls.py) ---------------------------------------------

    def send_headers(self, metadata: Any = ()) -> None:
        if self.headers_sent or self.finished:
            return
        self.headers_sent = True
        block = f.RESPONSE_HEADERS + (f.metadata_block(metadata) if metadata else b"")
        self.conn.write(f.frame(f.HEADERS, f.END_HEADERS, self.id, block))

    def send_message(self, data: bytes) -> asyncio.Future[None] | None:
        """Queue one reply message; a future to await while flow control holds it back."""
        if self.finished:
            return None
        limit = self.conn.server.max_send
        if len(data) > limit:
            self.finish(
                _RESOURCE_EXHAUSTED, f"Sent message larger than max ({len(data)} vs. {limit})"
            )
            return None
        self.send_headers()
        self.conn.send_data(self, _PREFIX.pack(0, len(data)) + data)
        if self.pending:
            if self.drained is None or self.drained.done():
                self.drained = self.conn.loop.create_future()
            return self.drained
        return None

    def reply(self, data: bytes, trailing: Any = ()) -> None:
        """A unary call's reply and OK status, in one write when the windows allow."""
        if self.finished:
            return
        conn = self.conn
        size = len(data) + 5
        limit = conn.server.max_send
        if (
            self.headers_sent
            or trailing
            or size > conn.send_window
            or size > self.send_window
            or size > conn.peer_max_frame
            or len(data) > limit
        ):
            self.send_message(data)
            self.finish(0, "", trailing)  # behind the DATA if flow control holds it
            return
        conn.send_window -= size
        self.send_window -= size
        self.headers_sent = True
        self.finished = True
        sid = self.id
        out = (
            f.frame(f.HEADERS, f.END_HEADERS, sid, f.RESPONSE_HEADERS)
            + _HEADER_FRAME.pack(0, size, f.DATA, 0, sid)
            + _PREFIX.pack(0, len(data))
            + data
            + f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, f.OK_TRAILERS)
        )
        if not self.remote_closed:
            out += f.rst_stream(sid, f.NO_ERROR)
        conn.write(out)
        conn.closed(self)

    def finish(self, code: int, message: str, trailing: Any = ()) -> None:
        """End the call with `code`: trailers (trailers-only when nothing was sent), then a
        reset if the client is still sending."""
        if self.finished:
            return
        self.finished = True
        block = f.trailers(code, message, trailing)
        if self.headers_sent:
            tail = f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, self.id, block)
        else:
            self.headers_sent = True
            tail = f.frame(
                f.HEADERS, f.END_HEADERS | f.END_STREAM, self.id, f.RESPONSE_HEADERS + block
            )
        if not self.remote_closed:
            tail += f.rst_stream(self.id, f.NO_ERROR)
        if self.pending:
            self.tail = tail  # after the DATA flow control still holds
            return
        self.conn.write(tail)
        self.conn.closed(self)

    # ---- what the transport does to it -----------------------------------------------------

    def expire(self) -> None:
        """Its deadline passed: DEADLINE_EXCEEDED, and the handler is cancelled."""
        self.timer = None
        if self.finished:
            return
        self.finish(_DEADLINE_EXCEEDED, "Deadline Exceeded")
        self.stop()

    def stop(self) -> None:
        """Cancel the handler (if it runs) and end the request messages."""
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self.inbox is not None:
            self.inbox.end()

    def reset(self) -> None:
        """The call is gone (the client reset it, or the connection ended): nothing more is
        sent, the handler is cancelled."""
        self.cancelled = True
        self.finished = True
        self.pending = None
        self.tail = b""
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.stop()
        self.conn.closed(self)


class Connection(asyncio.Protocol):
    """The HTTP/2 server side of one client connection."""

    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # streams with DATA waiting for window
        self.last_stream = 0
        self.send_window = f.DEFAULT_WINDOW
        self.peer_window = f.DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.going_away = False
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._decoder.max_allowed_table_size = 65536
        self._known: dict[bytes, Request] = {}
        self._buffer = bytearray()
        self._preface = False
        self._continuation: tuple[int, int, bytearray] | None = None
        self._recv_unacked = 0
        self._out: list[bytes] = []
        self._flush: asyncio.Handle | None = None
        self._receiving = False
        self._closed = False
        self._age: list[asyncio.TimerHandle] = []

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            host = f"[{peer[0]}]" if family == "ipv6" else peer[0]
            self.peer = f"{family}:{host}:{peer[1]}"
        else:
            self.peer = f"unix:{peer}" if peer else "unknown"
        self.server.connections.add(self)
        self.write(
            f.settings_frame(
                {
                    f.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                    f.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                    f.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                }
            )
            + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW)
        )
        self._age.append(self.loop.call_later(PREFACE_TIMEOUT_S, self._preface_due))
        age = self.server.max_connection_age_s
        if age > 0:
            self._age.append(self.loop.call_later(age, self.close_gracefully))
            self._age.append(
                self.loop.call_later(age + self.server.max_connection_age_grace_s, self.abort)
            )

    def _preface_due(self) -> None:
        if not self._preface and not self._closed:
            log.info("gRPC connection from %s sent no HTTP/2 preface: closed", self.peer)
            self._close()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._receiving = True
        try:
            self._receive(data)
        except ProtocolFault as fault:
            self._fail(fault.code, str(fault))
        except Exception:
            log.exception("gRPC connection from %s: unexpected error", self.peer)
            self._fail(f.INTERNAL_ERROR, "internal error")
        finally:
            self._receiving = False
        self._write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        for timer in self._age:
            timer.cancel()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._out.clear()
        for stream in list(self.streams.values()):
            stream.reset()
        self.streams.clear()
        self.blocked.clear()
        self.server.connection_closed()

    def pause_writing(self) -> None:
        # The client reads slower than we answer: read no more requests until it catches up.
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    # ---- writing ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes; they leave at the end of this read, or of this loop turn."""
        if self._closed:
            return
        self._out.append(data)
        if self._flush is None and not self._receiving:
            self._flush = self.loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush = None
        out = self._out
        if not out or self._closed or self.transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.transport.write(data)
        if self.going_away and not self.streams and not self.blocked:
            self._close()

    def send_data(self, stream: Stream, payload: bytes) -> None:
        """DATA for `stream`, as far as the windows allow; the rest waits in stream.pending."""
        if stream.pending:
            stream.pending.append(memoryview(payload))
            return
        size = len(payload)
        if size <= self.send_window and size <= stream.send_window and size <= self.peer_max_frame:
            self.send_window -= size
            stream.send_window -= size
            self.write(_HEADER_FRAME.pack(0, size, f.DATA, 0, stream.id) + payload)
            return
        stream.pending = deque((memoryview(payload),))
        self.blocked[stream.id] = stream
        self._push(stream)

    def _push(self, stream: Stream) -> None:
        pending = stream.pending
        while pending:
            room = min(self.send_window, stream.send_window, self.peer_max_frame)
            if room <= 0:
                return
            chunk = pending[0]
            if len(chunk) > room:
                piece, pending[0] = chunk[:room], chunk[room:]
            else:
                piece = pending.popleft()
            size = len(piece)
            self.send_window -= size
            stream.send_window -= size
            self.write(_HEADER_FRAME.pack(0, size, f.DATA, 0, stream.id) + bytes(piece))
        stream.pending = None
        self.blocked.pop(stream.id, None)
        if stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)
        if stream.tail:
            tail, stream.tail = stream.tail, b""
            self.write(tail)
            self.closed(stream)

    def closed(self, stream: Stream) -> None:
        """The stream sent its last frame (or was reset)."""
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.pending:
            return  # closed once its DATA has gone (see _push)
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        if (
            self.going_away
            and not self.streams
            and not self.blocked
            and not self._receiving
            and self._flush is None
        ):
            self._flush = self.loop.call_soon(self._write_out)

    # ---- reading ---------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            view = memoryview(buffer)
        else:
            view = memoryview(data)
        pos = 0
        if not self._preface:
            if len(view) < len(f.PREFACE):
                if bytes(view) != f.PREFACE[: len(view)]:
                    raise ProtocolFault(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._keep(view, 0)
                return
            if bytes(view[:24]) != f.PREFACE:
                raise ProtocolFault(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._preface = True
            pos = 24
        end = len(view)
        unpack = _HEADER_FRAME.unpack_from
        while end - pos >= 9:
            high, low, kind, flags, sid = unpack(view, pos)
            length = (high << 16) | low
            if length > f.DEFAULT_MAX_FRAME:
                raise ProtocolFault(f.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            stop = pos + 9 + length
            if stop > end:
                break
            payload = view[pos + 9 : stop]
            pos = stop
            sid &= 0x7FFFFFFF
            if self._continuation is not None and kind != f.CONTINUATION:
                raise ProtocolFault(f.PROTOCOL_ERROR, "a header block was interrupted")
            if kind == f.DATA:
                self._on_data(sid, flags, payload, length)
            elif kind == f.HEADERS:
                self._on_headers(sid, flags, payload)
            elif kind == f.CONTINUATION:
                self._on_continuation(sid, flags, payload)
            elif kind == f.WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif kind == f.SETTINGS:
                self._on_settings(sid, flags, payload)
            elif kind == f.PING:
                if len(payload) != 8 or sid:
                    raise ProtocolFault(f.FRAME_SIZE_ERROR, "a PING frame is 8 bytes, stream 0")
                if not flags & f.ACK:
                    self.write(f.frame(f.PING, f.ACK, 0, bytes(payload)))
            elif kind == f.RST_STREAM:
                if len(payload) != 4 or not sid:
                    raise ProtocolFault(f.FRAME_SIZE_ERROR, "RST_STREAM is 4 bytes, on a stream")
                if sid > self.last_stream:
                    raise ProtocolFault(f.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
                stream = self.streams.get(sid)
                if stream is not None:
                    stream.reset()
            elif kind == f.GOAWAY:
                pass  # the client stops opening streams; the ones it has still get answers
            elif kind == f.PUSH_PROMISE:
                raise ProtocolFault(f.PROTOCOL_ERROR, "a client cannot push")
            elif kind == f.PRIORITY and len(payload) != 5:
                raise ProtocolFault(f.FRAME_SIZE_ERROR, "PRIORITY is 5 bytes")
            # other types are extensions: ignored, as RFC 9113 asks
        self._keep(view, pos)

    def _keep(self, view: memoryview, pos: int) -> None:
        # A new buffer each time: slices of the old one may still be alive, and a bytearray
        # with live views cannot be resized.
        self._buffer = bytearray(view[pos:]) if pos < len(view) else bytearray()

    def _on_settings(self, sid: int, flags: int, payload: memoryview) -> None:
        if sid:
            raise ProtocolFault(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            return
        if len(payload) % 6:
            raise ProtocolFault(f.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for key, value in f.parse_settings(bytes(payload)):
            if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ProtocolFault(f.FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                delta = value - self.peer_window
                self.peer_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_LIMIT:
                    raise ProtocolFault(f.PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_max_frame = value
            elif key == f.SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolFault(f.PROTOCOL_ERROR, "ENABLE_PUSH is 0 or 1")
        self.write(f.frame(f.SETTINGS, f.ACK, 0))
        self._unblock()

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolFault(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE is 4 bytes")
        increment = f.u32(bytes(payload)) & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise ProtocolFault(f.PROTOCOL_ERROR, "a zero window increment")
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise ProtocolFault(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._unblock()
            return
        stream = self.streams.get(sid)
        if stream is None:
            return  # a stream that has ended
        if increment == 0:
            self._reset_stream(stream, f.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            self._reset_stream(stream, f.FLOW_CONTROL_ERROR)
            return
        if stream.pending:
            self._push(stream)

    def _unblock(self) -> None:
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._push(stream)

    def _reset_stream(self, stream: Stream, code: int) -> None:
        self.write(f.rst_stream(stream.id, code))
        stream.reset()

    # -- headers --

    def _on_headers(self, sid: int, flags: int, payload: memoryview) -> None:
        if not sid:
            raise ProtocolFault(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & f.PADDED:
            if not payload:
                raise ProtocolFault(f.PROTOCOL_ERROR, "a padded frame without its pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise ProtocolFault(f.PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1 : len(payload) - pad]
        if flags & f.PRIORITY_FLAG:
            payload = payload[5:]
        if flags & f.END_HEADERS:
            self._headers(sid, flags, bytes(payload))
        else:
            self._continuation = (sid, flags, bytearray(payload))

    def _on_continuation(self, sid: int, flags: int, payload: memoryview) -> None:
        pending = self._continuation
        if pending is None or pending[0] != sid:
            raise ProtocolFault(f.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = pending[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise ProtocolFault(f.ENHANCE_YOUR_CALM, "a header block above 64 KiB")
        if flags & f.END_HEADERS:
            self._continuation = None
            self._headers(sid, pending[1], bytes(block))

    def _decode(self, block: bytes) -> Request:
        """The block's fields; a block that leaves the HPACK table as it was is kept, since
        the same bytes then mean the same headers (until the table next changes)."""
        known = self._known.get(block)
        if known is not None:
            return known
        table = self._decoder.header_table
        entries = table.dynamic_entries
        newest = entries[0] if entries else None
        size = table.maxsize
        try:
            fields = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise ProtocolFault(f.COMPRESSION_ERROR, f"header block: {exc}") from exc
        request = Request(fields)  # type: ignore[arg-type]
        if (entries[0] if entries else None) is newest and table.maxsize == size:
            if len(self._known) >= _CACHE_ENTRIES:
                self._known.clear()
            self._known[block] = request
        else:
            self._known.clear()  # indices moved: what was kept may mean something else now
        return request

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        request = self._decode(block)  # always, in order: the HPACK table must stay in step
        stream = self.streams.get(sid)
        if stream is not None:
            # Trailers from the client (gRPC sends none); they can only end its side.
            if flags & f.END_STREAM:
                self._end_remote(stream)
            return
        if sid % 2 == 0:
            raise ProtocolFault(f.PROTOCOL_ERROR, "a client stream id must be odd")
        if sid <= self.last_stream:
            return  # a stream that has ended: STREAM_CLOSED, nothing to answer
        self.last_stream = sid
        if self.going_away:
            self.write(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        if len(self.streams) >= MAX_STREAMS:
            self.write(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        if request.method != b"POST":
            self.write(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, _STATUS_405))
            return
        if not request.content_type.startswith(b"application/grpc"):
            self.write(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, _STATUS_415))
            return
        server = self.server
        handler = server.lookup(request.path)
        if handler is None:
            self._refuse(sid, _UNIMPLEMENTED, "Method not found!", flags)
            return
        if request.size > MAX_HEADER_LIST // 2:
            self._refuse(sid, _RESOURCE_EXHAUSTED, "request metadata too large", flags)
            return
        if server.max_calls and server.calls >= server.max_calls:
            self._refuse(sid, _RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", flags)
            return
        if request.encoding not in (b"", b"identity", b"gzip", b"deflate"):
            self._refuse(
                sid,
                _UNIMPLEMENTED,
                f"grpc-encoding {request.encoding.decode('latin-1')!r} is not supported "
                "(identity, gzip, deflate)",
                flags,
            )
            return
        stream = Stream(self, sid, handler, request)
        self.streams[sid] = stream
        if request.timeout:
            timeout = f.parse_timeout(request.timeout)
            if timeout is not None:
                stream.deadline = self.loop.time() + timeout
                stream.timer = self.loop.call_at(stream.deadline, stream.expire)
        if handler.request_streaming:
            stream.inbox = Inbox(handler.request_deserializer)
            self._start(stream, None)
        if flags & f.END_STREAM:
            self._end_remote(stream)

    def _refuse(self, sid: int, code: int, message: str, flags: int) -> None:
        """A trailers-only answer to a call that never starts."""
        block = f.RESPONSE_HEADERS + f.trailers(code, message)
        out = f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, block)
        if not flags & f.END_STREAM:
            out += f.rst_stream(sid, f.NO_ERROR)
        self.write(out)

    # -- data --

    def _on_data(self, sid: int, flags: int, payload: memoryview, length: int) -> None:
        if not sid:
            raise ProtocolFault(f.PROTOCOL_ERROR, "DATA on stream 0")
        self._recv_unacked += length
        if self._recv_unacked > CONNECTION_WINDOW:
            raise ProtocolFault(f.FLOW_CONTROL_ERROR, "the connection's window was overrun")
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            self.write(f.window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_stream:
                raise ProtocolFault(f.PROTOCOL_ERROR, "DATA on an idle stream")
            return  # an ended stream: what was in flight is dropped
        if stream.remote_closed:
            self._reset_stream(stream, f.STREAM_CLOSED)
            return
        if flags & f.PADDED:
            if not payload:
                raise ProtocolFault(f.PROTOCOL_ERROR, "a padded frame without its pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise ProtocolFault(f.PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1 : len(payload) - pad]
        stream.recv_unacked += length
        if stream.recv_unacked > STREAM_WINDOW:
            self._reset_stream(stream, f.FLOW_CONTROL_ERROR)
            return
        if not stream.finished:
            self._messages(stream, payload)
        if flags & f.END_STREAM:
            self._end_remote(stream)
        elif stream.recv_unacked >= STREAM_WINDOW // 2 and not stream.finished:
            self.write(f.window_update(sid, stream.recv_unacked))
            stream.recv_unacked = 0

    def _messages(self, stream: Stream, data: memoryview) -> None:
        """Split gRPC's length-prefixed messages out of a stream's DATA."""
        buffer = stream.buffer
        view: memoryview | bytearray = data
        if buffer is not None:
            buffer += data
            view = buffer
        pos = 0
        end = len(view)
        limit = self.server.max_receive
        while end - pos >= 5:
            compressed, size = _PREFIX.unpack_from(view, pos)
            if size > limit:
                self._stream_error(
                    stream,
                    _RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({size} vs. {limit})",
                )
                return
            if end - pos - 5 < size:
                break
            raw = bytes(view[pos + 5 : pos + 5 + size])
            pos += 5 + size
            if compressed:
                inflated = self._inflate(stream, raw, limit)
                if inflated is None:
                    return
                raw = inflated
            if stream.inbox is not None:
                stream.inbox.put(raw)
            elif stream.message is None:
                stream.message = raw
            else:
                self._stream_error(stream, _UNIMPLEMENTED, "more than one request message")
                return
        if buffer is not None:
            del buffer[:pos]
            if not buffer:
                stream.buffer = None
        elif pos < end:
            stream.buffer = bytearray(view[pos:])

    def _inflate(self, stream: Stream, raw: bytes, limit: int) -> bytes | None:
        encoding = stream.encoding
        if encoding not in (b"gzip", b"deflate"):
            self._stream_error(
                stream, _INTERNAL, "a compressed message without grpc-encoding gzip or deflate"
            )
            return None
        inflater = zlib.decompressobj(31 if encoding == b"gzip" else 15)
        try:
            out = inflater.decompress(raw, limit + 1)
        except zlib.error as exc:
            self._stream_error(stream, _INTERNAL, f"the message does not decompress: {exc}")
            return None
        if len(out) > limit or inflater.unconsumed_tail:
            self._stream_error(
                stream, _RESOURCE_EXHAUSTED, f"Received message larger than max (> {limit})"
            )
            return None
        return out

    def _stream_error(self, stream: Stream, code: int, message: str) -> None:
        stream.finish(code, message)
        stream.stop()
        stream.buffer = None

    def _end_remote(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.finished:
            return
        if stream.buffer:
            self._stream_error(stream, _INTERNAL, "the request ended inside a message")
            return
        if stream.inbox is not None:
            stream.inbox.end()
            return
        raw = stream.message
        stream.message = None
        if raw is None:
            self._stream_error(stream, _UNIMPLEMENTED, "a unary call without its request message")
            return
        deserialize = stream.handler.request_deserializer
        try:
            request = raw if deserialize is None else deserialize(raw)
        except Exception as exc:
            self._stream_error(stream, _INVALID_ARGUMENT, unparsable(exc))
            return
        self._start(stream, request)

    def _start(self, stream: Stream, request: Any) -> None:
        server = self.server
        handler = stream.handler
        unary = handler.unary_unary is not None
        run = run_unary if unary else run_streaming
        task = self.loop.create_task(run(stream, handler, request))
        stream.task = task
        server.calls += 1
        if unary:
            server.unary_calls += 1
        task.add_done_callback(server.unary_done if unary else server.call_done)

    # ---- ending ----------------------------------------------------------------------------

    def close_gracefully(self) -> None:
        """GOAWAY: no new streams; the connection closes once its streams have finished."""
        if self._closed or self.going_away:
            return
        self.going_away = True
        self.write(f.goaway(self.last_stream, f.NO_ERROR))
        if not self.streams and not self.blocked and self._flush is None:
            self._flush = self.loop.call_soon(self._write_out)

    def abort(self) -> None:
        """End what is still running (UNAVAILABLE) and close."""
        if self._closed:
            return
        for stream in list(self.streams.values()):
            if not stream.finished:
                stream.finish(_UNAVAILABLE, "the server is shutting down")
            stream.stop()
        self.going_away = True
        self._write_out()
        self._close()

    def _fail(self, code: int, message: str) -> None:
        log.info("gRPC connection from %s: %s (GOAWAY %d)", self.peer, message, code)
        self._out.clear()
        self.write(f.goaway(self.last_stream, code, message.encode("utf-8")[:256]))
        self._write_out()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            self.transport.close()
