"""One HTTP/2 connection of the native gRPC transport: frames in, calls started, frames out.

An `asyncio.Protocol`, so the event loop hands it whatever bytes one read returned; it parses
every whole frame in them, starts the calls they complete, and answers in one write at the
end of the read (replies produced later, by handlers, leave in one write per loop turn). No
thread is involved: grpc.aio's path has gRPC core's I/O threads and its completion-queue poller
between the socket and the loop, ~7 context switches per unary call on this project's
machine, which is most of what a Python gRPC server spends per call.

What it holds to (RFC 9113 and gRPC's PROTOCOL-HTTP2):

- the connection preface and SETTINGS (acknowledged, applied: the peer's initial window, frame
  size, header table size);
- flow control both ways. Out: DATA waits for the peer's windows (a reply held back waits, its
  trailers behind it; a handler writing a stream waits with it, and while the socket's buffer is
  full). In: a stream's window reopens as the bytes of the message being read arrive (bounded by
  `max_message_bytes`) or, on a streaming call, as the handler takes its messages, so a slow
  handler holds its client back; the connection's reopens while what the connection holds
  unconsumed stays under twice `max_message_bytes`;
- header blocks across CONTINUATION frames, decoded in order so the HPACK table stays in step (a
  small block that changes nothing in it is remembered, so the usual repeated request headers
  are decoded once);
- PING answered; RST_STREAM cancelling the call (a connection that resets most of what it opens,
  CVE-2023-44487's rapid reset, gets ENHANCE_YOUR_CALM); a graceful GOAWAY in two steps (first
  "no more", then, after a PING's round trip, the last stream it will answer), after which the
  connection reads and drops what the peer still sends and closes once it is quiet; a protocol
  error answered GOAWAY naming it.

And gRPC's: `application/grpc` only (415 otherwise), POST only (405), unknown method
UNIMPLEMENTED, grpc-timeout as a deadline that cancels the handler and answers
DEADLINE_EXCEEDED, the message size limits both ways (RESOURCE_EXHAUSTED), gzip and deflate
request messages, metadata (`-bin` values base64) in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
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

# What a peer may send on a stream before we open its window again.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_STREAMS = 1024  # per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
# Request metadata: what we advertise (SETTINGS_MAX_HEADER_LIST_SIZE, gRPC core's hard limit)
# and the most a call may carry before it is refused RESOURCE_EXHAUSTED (its soft one).
MAX_HEADER_LIST = 16 * 1024
MAX_METADATA = 8 * 1024
MAX_HEADER_BLOCK = 16 * 1024  # compressed, across CONTINUATION frames
MAX_DATA_FRAME = 64 * 1024  # the DATA we send: streams interleave in frames of at most this
_CACHE_ENTRIES = 256
_CACHE_BLOCK = 512  # header blocks up to this many bytes are remembered
# A connection that has not sent the HTTP/2 preface by then is closed (a client that connects
# and says nothing holds a socket and a file descriptor for nothing).
PREFACE_TIMEOUT_S = 10.0
# After the last GOAWAY with nothing left to answer: how long to read and drop what the peer
# still sends before closing (closing with unread bytes makes the kernel send a reset, which
# can destroy replies the peer has not read yet).
LINGER_S = 1.0
# Rapid reset: a connection whose client reset more than this many calls in the same read that
# opened them, and more than half of all it opened, is ended with ENHANCE_YOUR_CALM.
MAX_RESETS = 2 * MAX_STREAMS
# SETTINGS frames a connection may send at once, and per second after that.
MAX_SETTINGS = 1000
SETTINGS_PER_S = 10.0
_GOAWAY_PING = b"goaway\x00\x01"

_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]

_STATUS_405 = b"\x08" + bytes((3,)) + b"405"  # :status (static name 8), literal value
_STATUS_415 = b"\x08" + bytes((3,)) + b"415"
_TABLE_SIZE_ZERO = b"\x20"  # HPACK dynamic table size update to 0
_HEADER_FRAME = f.FRAME_HEADER
_PREFIX = f.MESSAGE_PREFIX
_RESPONSE_HEADERS_FRAME = f.frame(f.HEADERS, f.END_HEADERS, 0, f.RESPONSE_HEADERS)


class ProtocolFault(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _grpc_content_type(value: bytes) -> bool:
    return value == b"application/grpc" or value.startswith((b"application/grpc+", b"application/grpc;"))  # fmt: skip


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
                    metadata.append((key, _text(value)))
        self.metadata = tuple(metadata)
        self.size = size


class Stream:
    """One call: its state on the wire and the handler's task."""

    __slots__ = (
        "born",
        "buffer",
        "cancelled",
        "conn",
        "context",
        "counted",
        "deadline",
        "drained",
        "encoding",
        "finished",
        "handler",
        "headers_sent",
        "held",
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
        self.born = conn.reads  # the read that opened it
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
        self.recv_unacked = 0  # DATA bytes received since the stream's window last opened
        self.held = 0  # DATA bytes received that no handler has taken yet
        self.send_window = conn.peer_window
        self.headers_sent = False
        self.remote_closed = False
        self.finished = False  # the status is sent (or queued behind data), or the call reset
        self.cancelled = False
        self.counted = False  # counted in the server's calls
        self.pending: deque[memoryview] | None = None  # DATA waiting for window
        self.tail = b""  # the trailers' header block, waiting behind pending DATA
        self.drained: asyncio.Future[None] | None = None

    # ---- what handlers send (through calls.py) ---------------------------------------------

    def send_headers(self, metadata: Any = ()) -> None:
        if self.headers_sent or self.finished:
            return
        block = f.RESPONSE_HEADERS + (f.metadata_block(metadata) if metadata else b"")
        out = self.conn.header_frames(self.id, f.END_HEADERS, block)
        self.headers_sent = True
        self.conn.write(out)

    def send_message(self, data: bytes) -> asyncio.Future[None] | None:
        """Queue one reply message; a future to await while flow control (or a full socket
        buffer) holds it back."""
        if self.finished:
            return None
        limit = self.conn.server.max_send
        if len(data) > limit:
            self.finish(
                _RESOURCE_EXHAUSTED, f"Sent message larger than max ({len(data)} vs. {limit})"
            )
            self.stop()
            return None
        self.send_headers()
        conn = self.conn
        conn.send_data(self, _PREFIX.pack(0, len(data)) + data)
        if self.pending:
            if self.drained is None or self.drained.done():
                self.drained = conn.loop.create_future()
            return self.drained
        return conn.writable()

    def reply(self, data: bytes, trailing: Any = ()) -> None:
        """A unary call's reply and OK status, in one write when the windows allow."""
        if self.finished:
            return
        conn = self.conn
        size = len(data) + 5
        if (
            self.headers_sent
            or trailing
            or size > conn.send_window
            or size > self.send_window
            or size > conn.max_data
            or len(data) > conn.server.max_send
            or conn.hpack_prefix
        ):
            self.send_message(data)
            self.finish(0, "", trailing)  # behind the DATA if flow control holds it
            return
        sid = self.id
        out = (
            f.frame(f.HEADERS, f.END_HEADERS, sid, f.RESPONSE_HEADERS)
            + f.header(f.DATA, 0, sid, size)
            + _PREFIX.pack(0, len(data))
            + data
            + f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, f.OK_TRAILERS)
        )
        if not self.remote_closed:
            out += f.rst_stream(sid, f.NO_ERROR)
        conn.send_window -= size
        self.send_window -= size
        self.headers_sent = True
        self.finished = True
        conn.write(out)
        conn.closed(self)

    def finish(self, code: int, message: str, trailing: Any = ()) -> None:
        """End the call with `code`: trailers (trailers-only when nothing was sent), then a
        reset if the client is still sending."""
        if self.finished:
            return
        block = f.trailers(code, message, trailing)
        if not self.headers_sent:
            block = f.RESPONSE_HEADERS + block
        self.finished = True
        self.headers_sent = True
        if self.pending:
            # After the DATA flow control still holds; framed when it goes (a table size
            # update we owe must lead the first block on the wire, not the first built).
            self.tail = block
            return
        self.conn.write_trailers(self, block)
        self.conn.closed(self)

    def ended(self) -> None:
        """The handler's task is over. A stream it left open (a bug, or an exception while its
        reply was being built) is reset, so the client is not left waiting."""
        if not self.finished:
            log.error("a gRPC handler ended without a status: stream %d reset", self.id)
            self.conn.reset_stream(self, f.INTERNAL_ERROR)

    # ---- what the transport does to it -----------------------------------------------------

    def expire(self) -> None:
        """Its deadline passed: DEADLINE_EXCEEDED, and the handler is cancelled."""
        self.timer = None
        if self.finished:
            return
        if self.pending:
            # The status would wait behind DATA the client is not letting through.
            self.conn.reset_stream(self, f.CANCEL)
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

    def taken(self, wire: int) -> None:
        """The handler took a message of `wire` bytes from the inbox."""
        if self.conn.streams.get(self.id) is self:
            self.conn.release(self, wire)


class Connection(asyncio.Protocol):
    """The HTTP/2 server side of one client connection."""

    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # pending DATA waiting on the connection window
        self.sending: dict[int, Stream] = {}  # every stream with pending DATA
        self.last_stream = 0
        self.send_window = f.DEFAULT_WINDOW
        self.peer_window = f.DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_data = f.DEFAULT_MAX_FRAME  # DATA frame size: min(peer's max, MAX_DATA_FRAME)
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.hpack_prefix = b""  # a table size update owed at the start of our next block
        self.going_away = False  # the last GOAWAY went: new streams are refused
        self.held = 0  # DATA bytes received on this connection no handler has taken yet
        self.hold_limit = max(2 * server.max_receive, CONNECTION_WINDOW)
        self.starved: dict[int, Stream] = {}  # window held back while held > hold_limit
        self.favoured: Stream | None = None  # the one stream whose window opens meanwhile
        self.running = 0  # handler tasks not yet ended (reset calls' included)
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._decoder.max_allowed_table_size = 4096
        self._known: dict[bytes, Request] = {}
        self._buffer = bytearray()
        self._preface = False
        self._continuation: tuple[int, int, bytearray] | None = None
        self._recv_unacked = 0
        self._out: list[bytes] = []
        self._flush: asyncio.Handle | None = None
        self._receiving = False
        self._closed = False
        self._lingering = False
        self._draining = False  # the first GOAWAY went; the last follows the PING's answer
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._opened = 0
        self._resets = 0
        self.reads = 0  # reads of the socket so far
        self._settings = float(MAX_SETTINGS)  # a token bucket: SETTINGS frames allowed now
        self._settings_at = server.loop.time()

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
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # the kernel notices a peer that vanished
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.server.connections.add(self)
        self.server.accepted += 1
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
        self._timers.append(self.loop.call_later(PREFACE_TIMEOUT_S, self._preface_due))
        age = self.server.max_connection_age_s
        if age > 0:
            age *= random.uniform(0.9, 1.1)  # as gRPC core: connections made together part
            self._timers.append(self.loop.call_later(age, self.close_gracefully))
            self._timers.append(
                self.loop.call_later(age + self.server.max_connection_age_grace_s, self.abort)
            )

    def _preface_due(self) -> None:
        if not self._preface and not self._closed:
            log.info("gRPC connection from %s sent no HTTP/2 preface: closed", self.peer)
            self._close()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._lingering:
            return  # closing: what the peer still sends is read and dropped
        self._receiving = True
        self.reads += 1
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

    def eof_received(self) -> bool:
        # The peer will send nothing more; calls still running may still be answered.
        for stream in list(self.streams.values()):
            if stream.pending or (not stream.remote_closed and stream.inbox is None):
                # It can never finish: its message or our window updates will not come.
                self.reset_stream(stream, f.CANCEL)
            elif stream.inbox is not None:
                stream.inbox.end()
        if self.streams and not self._closed:
            self.going_away = True  # it can open no more: close once these are answered
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        for timer in self._timers:
            timer.cancel()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._out.clear()
        for stream in list(self.streams.values()):
            stream.reset()
        self.streams.clear()
        self.blocked.clear()
        self.sending.clear()
        self._resume_writers()
        self.server.connection_closed()

    def pause_writing(self) -> None:
        # The client reads slower than we answer: read no more requests, and streaming
        # handlers' writes wait (send_message), until it catches up.
        self._paused = True
        if self.transport is not None and not self._closed and not self._lingering:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._resume_writers()
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def writable(self) -> asyncio.Future[None] | None:
        """A future to await while the socket's buffer is full (None: write on)."""
        if not self._paused:
            return None
        if self._writable is None or self._writable.done():
            self._writable = self.loop.create_future()
        return self._writable

    def _resume_writers(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

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
        if self._closed or self.transport is None:
            out.clear()
            return
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.transport.write(data)
        if self.going_away and not self.streams and not self.sending:
            self._linger()

    def header_frames(self, sid: int, flags: int, block: bytes) -> bytes:
        """HEADERS (+ CONTINUATION) frames carrying `block`, with the table size update we
        owe the peer in front of it."""
        if self.hpack_prefix:
            block = self.hpack_prefix + block
            self.hpack_prefix = b""
        limit = self.peer_max_frame
        if len(block) <= limit:
            return f.frame(f.HEADERS, flags, sid, block)
        pieces = [block[i : i + limit] for i in range(0, len(block), limit)]
        out = [f.frame(f.HEADERS, flags & ~f.END_HEADERS, sid, pieces[0])]
        for piece in pieces[1:-1]:
            out.append(f.frame(f.CONTINUATION, 0, sid, piece))
        out.append(f.frame(f.CONTINUATION, f.END_HEADERS, sid, pieces[-1]))
        return b"".join(out)

    def write_trailers(self, stream: Stream, block: bytes) -> None:
        out = self.header_frames(stream.id, f.END_HEADERS | f.END_STREAM, block)
        if not stream.remote_closed:
            out += f.rst_stream(stream.id, f.NO_ERROR)
        self.write(out)

    def send_data(self, stream: Stream, payload: bytes) -> None:
        """DATA for `stream`, as far as the windows allow; the rest waits in stream.pending."""
        if stream.pending:
            stream.pending.append(memoryview(payload))
            return
        size = len(payload)
        if size <= self.send_window and size <= stream.send_window and size <= self.max_data:
            self.write(f.header(f.DATA, 0, stream.id, size) + payload)
            self.send_window -= size
            stream.send_window -= size
            return
        stream.pending = deque((memoryview(payload),))
        self.sending[stream.id] = stream
        self._push(stream)

    def _push(self, stream: Stream) -> None:
        pending = stream.pending
        while pending:
            room = min(self.send_window, stream.send_window, self.max_data)
            if room <= 0:
                if stream.send_window > 0:
                    self.blocked[stream.id] = stream  # waits for the connection's window
                else:
                    self.blocked.pop(stream.id, None)  # waits for its own
                return
            chunk = pending[0]
            if len(chunk) > room:
                piece, pending[0] = chunk[:room], chunk[room:]
            else:
                piece = pending.popleft()
            size = len(piece)
            self.write(f.header(f.DATA, 0, stream.id, size) + bytes(piece))
            self.send_window -= size
            stream.send_window -= size
        stream.pending = None
        self.sending.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        if stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)
        if stream.tail:
            block, stream.tail = stream.tail, b""
            self.write_trailers(stream, block)
            self.closed(stream)

    def _unblock(self) -> None:
        """The connection's window grew: the streams waiting on it, oldest first, while it
        lasts (each push either empties a stream or uses the window up)."""
        blocked = self.blocked
        while blocked and self.send_window > 0:
            sid = next(iter(blocked))
            stream = blocked.pop(sid)
            self._push(stream)

    def closed(self, stream: Stream) -> None:
        """The stream sent its last frame (or was reset)."""
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.pending:
            return  # closed once its DATA has gone (see _push)
        if self.streams.pop(stream.id, None) is None:
            return
        self.blocked.pop(stream.id, None)
        self.sending.pop(stream.id, None)
        if stream.counted:
            stream.counted = False
            self.server.calls -= 1
        self.starved.pop(stream.id, None)
        if stream.held:
            self.release(stream, stream.held)  # (and the windows held back may open)
        elif self.favoured is stream:
            self.favoured = None
            self._regrant()
        if stream.inbox is not None:
            stream.inbox.drop()  # what it held is released above; the handler reads the end
        stream.buffer = None
        stream.message = None
        if self.going_away and not self.streams and not self._receiving and self._flush is None:
            self._flush = self.loop.call_soon(self._write_out)

    def reset_stream(self, stream: Stream, code: int) -> None:
        self.write(f.rst_stream(stream.id, code))
        stream.reset()

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
        while end - pos >= 9 and not self._closed:
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
                self._on_ping(sid, flags, payload)
            elif kind == f.RST_STREAM:
                self._on_rst_stream(sid, payload)
            elif kind == f.GOAWAY:
                pass  # the client stops opening streams; the ones it has still get answers
            elif kind == f.PUSH_PROMISE:
                raise ProtocolFault(f.PROTOCOL_ERROR, "a client cannot push")
            elif kind == f.PRIORITY:
                if len(payload) != 5:
                    raise ProtocolFault(f.FRAME_SIZE_ERROR, "PRIORITY is 5 bytes")
                if not sid:
                    raise ProtocolFault(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
            # other types are extensions: ignored, as RFC 9113 asks
        self._keep(view, pos)

    def _keep(self, view: memoryview, pos: int) -> None:
        # A new buffer each time: slices of the old one may still be alive, and a bytearray
        # with live views cannot be resized.
        self._buffer = bytearray(view[pos:]) if pos < len(view) else bytearray()

    def _on_ping(self, sid: int, flags: int, payload: memoryview) -> None:
        if sid:
            raise ProtocolFault(f.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolFault(f.FRAME_SIZE_ERROR, "a PING frame is 8 bytes")
        if not flags & f.ACK:
            self.write(f.frame(f.PING, f.ACK, 0, bytes(payload)))
        elif self._draining and bytes(payload) == _GOAWAY_PING:
            self._last_goaway()

    def _on_rst_stream(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolFault(f.FRAME_SIZE_ERROR, "RST_STREAM is 4 bytes")
        if not sid or sid > self.last_stream:
            raise ProtocolFault(f.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        stream = self.streams.get(sid)
        if stream is None:
            return
        if not stream.finished and stream.born == self.reads:
            # Reset in the read that opened it (CVE-2023-44487's pattern: a client cancelling
            # after it sent a call, or at its deadline, is counted nowhere).
            self._resets += 1
            if self._resets > MAX_RESETS and 2 * self._resets > self._opened:
                raise ProtocolFault(f.ENHANCE_YOUR_CALM, "too many calls reset by the client")
        stream.reset()

    def _on_settings(self, sid: int, flags: int, payload: memoryview) -> None:
        if sid:
            raise ProtocolFault(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise ProtocolFault(f.FRAME_SIZE_ERROR, "a SETTINGS ACK carries nothing")
            return
        if len(payload) % 6:
            raise ProtocolFault(f.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        now = self.loop.time()
        self._settings = (
            min(MAX_SETTINGS, self._settings + (now - self._settings_at) * SETTINGS_PER_S) - 1
        )
        self._settings_at = now
        if self._settings < 0:
            raise ProtocolFault(f.ENHANCE_YOUR_CALM, "too many SETTINGS frames")
        window = None
        for key, value in f.parse_settings(bytes(payload)):
            if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ProtocolFault(f.FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                window = value  # the last one counts
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_LIMIT:
                    raise ProtocolFault(f.PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_max_frame = value
                self.max_data = min(value, MAX_DATA_FRAME)
            elif key == f.SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolFault(f.PROTOCOL_ERROR, "ENABLE_PUSH is 0 or 1")
            elif key == f.SETTINGS_HEADER_TABLE_SIZE and value < 4096:
                # We never add to our table, but the peer may expect it shrunk: say so.
                self.hpack_prefix = _TABLE_SIZE_ZERO
        self.write(f.frame(f.SETTINGS, f.ACK, 0))
        if window is not None and window != self.peer_window:
            delta = window - self.peer_window
            self.peer_window = window
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > f.MAX_WINDOW:
                    raise ProtocolFault(f.FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            if delta > 0:
                for stream in list(self.sending.values()):
                    if self.send_window > 0:
                        self._push(stream)
                    elif stream.send_window > 0:
                        self.blocked[stream.id] = stream  # now waits on the connection

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
        if sid > self.last_stream:
            raise ProtocolFault(f.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        stream = self.streams.get(sid)
        if stream is None:
            return  # a stream that has ended
        if increment == 0:
            self.reset_stream(stream, f.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            self.reset_stream(stream, f.FLOW_CONTROL_ERROR)
            return
        if stream.pending:
            self._push(stream)

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
            if len(payload) < 5:
                raise ProtocolFault(f.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
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
            raise ProtocolFault(f.ENHANCE_YOUR_CALM, "a header block above 16 KiB")
        if flags & f.END_HEADERS:
            self._continuation = None
            self._headers(sid, pending[1], bytes(block))

    def _decode(self, block: bytes) -> Request:
        """The block's fields. A small block that leaves the HPACK table as it was is kept:
        the same bytes then mean the same headers, until the table next changes."""
        known = self._known.get(block)
        if known is not None:
            return known
        table = self._decoder.header_table
        entries = table.dynamic_entries
        before = (entries[0] if entries else None, len(entries), table._current_size, table.maxsize)
        try:
            fields = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise ProtocolFault(f.COMPRESSION_ERROR, f"header block: {exc}") from exc
        request = Request(fields)  # type: ignore[arg-type]
        after = (entries[0] if entries else None, len(entries), table._current_size, table.maxsize)
        if after[0] is before[0] and after[1:] == before[1:]:
            if len(block) <= _CACHE_BLOCK and request.size <= MAX_METADATA:
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
            if stream.remote_closed:
                self.reset_stream(stream, f.STREAM_CLOSED)
            elif flags & f.END_STREAM:
                self._end_remote(stream)  # trailers from the client: they end its side
            else:
                self.reset_stream(stream, f.PROTOCOL_ERROR)  # a second block, not the last
            return
        if sid % 2 == 0:
            raise ProtocolFault(f.PROTOCOL_ERROR, "a client stream id must be odd")
        if sid <= self.last_stream:
            return  # a stream that has ended: STREAM_CLOSED, nothing to answer
        self.last_stream = sid
        self._opened += 1
        if self.going_away or len(self.streams) >= MAX_STREAMS or self.running >= MAX_STREAMS:
            # (running: a call the client reset still counts until its handler has ended)
            self.write(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        if request.method != b"POST":
            self._http_status(sid, _STATUS_405, flags)
            return
        if not _grpc_content_type(request.content_type):
            self._http_status(sid, _STATUS_415, flags)
            return
        server = self.server
        handler = server.lookup(request.path)
        if handler is None:
            self._refuse(sid, _UNIMPLEMENTED, "Method not found!", flags)
            return
        if request.size > MAX_METADATA:
            self._refuse(
                sid,
                _RESOURCE_EXHAUSTED,
                f"request metadata of {request.size} bytes is above {MAX_METADATA}",
                flags,
            )
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
        stream.counted = True
        server.calls += 1
        if request.timeout:
            timeout = f.parse_timeout(request.timeout)
            if timeout is not None:
                stream.deadline = self.loop.time() + timeout
                stream.timer = self.loop.call_at(stream.deadline, stream.expire)
        if handler.request_streaming:
            stream.inbox = Inbox(handler.request_deserializer, stream.taken)
            self._start(stream, None)
        if flags & f.END_STREAM:
            self._end_remote(stream)

    def _http_status(self, sid: int, block: bytes, flags: int) -> None:
        out = self.header_frames(sid, f.END_HEADERS | f.END_STREAM, block)
        if not flags & f.END_STREAM:
            out += f.rst_stream(sid, f.NO_ERROR)
        self.write(out)

    def _refuse(self, sid: int, code: int, message: str, flags: int) -> None:
        """A trailers-only answer to a call that never starts."""
        self._http_status(sid, f.RESPONSE_HEADERS + f.trailers(code, message), flags)

    # -- data --

    def _on_data(self, sid: int, flags: int, payload: memoryview, length: int) -> None:
        if not sid:
            raise ProtocolFault(f.PROTOCOL_ERROR, "DATA on stream 0")
        self._recv_unacked += length
        if self._recv_unacked > CONNECTION_WINDOW:
            raise ProtocolFault(f.FLOW_CONTROL_ERROR, "the connection's window was overrun")
        stream = self.streams.get(sid)
        if stream is None:
            self._credit()
            if sid > self.last_stream:
                raise ProtocolFault(f.PROTOCOL_ERROR, "DATA on an idle stream")
            return  # an ended stream: what was in flight is dropped
        if stream.remote_closed:
            self._credit()
            self.reset_stream(stream, f.STREAM_CLOSED)
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
            self._credit()
            self.reset_stream(stream, f.FLOW_CONTROL_ERROR)
            return
        if not stream.finished and payload:
            size = len(payload)
            stream.held += size
            self.held += size
            self._messages(stream, payload)
        if flags & f.END_STREAM:
            self._end_remote(stream)
        else:
            self._grant(stream)
        self._credit()

    def _grant(self, stream: Stream) -> bool:
        """Reopen the stream's window once half of it is used, unless its handler has a stream
        window's worth of messages still to take (then when it takes them), or the connection
        holds more than hold_limit for handlers (then one stream, `favoured`, goes on until its
        message is out, so some message always completes, and the rest wait in `starved`).
        True when the window is open."""
        if stream.recv_unacked < STREAM_WINDOW // 2 or stream.finished or stream.remote_closed:
            return True
        if stream.inbox is not None and stream.inbox.queued >= STREAM_WINDOW:
            return False
        if self.held > self.hold_limit:
            favoured = self.favoured
            if (
                favoured is None
                or self.streams.get(favoured.id) is not favoured
                or favoured.finished
                or favoured.remote_closed
            ):
                self.favoured = favoured = stream
            if favoured is not stream:
                self.starved.setdefault(stream.id, stream)
                return False
        self.starved.pop(stream.id, None)
        self.write(f.window_update(stream.id, stream.recv_unacked))
        stream.recv_unacked = 0
        return True

    def _credit(self) -> None:
        """Reopen the connection's window once half of it is used (what one connection may
        make the server hold is bounded per stream, in _grant)."""
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            self.write(f.window_update(0, self._recv_unacked))
            self._recv_unacked = 0

    def release(self, stream: Stream, size: int) -> None:
        """A handler took `size` bytes of `stream` (or the stream is gone with them)."""
        size = min(size, stream.held)
        stream.held -= size
        self.held -= size
        if self.favoured is stream:
            self.favoured = None  # its message is out (or it is gone)
        if self._closed:
            return
        if self.streams.get(stream.id) is stream:
            self._grant(stream)
        self._regrant()

    def _regrant(self) -> None:
        """Streams whose window was held back while the connection held too much, oldest
        first: all of them once there is room again, else the oldest becomes the favoured."""
        starved = self.starved
        while starved:
            sid = next(iter(starved))
            stream = starved[sid]
            if self.streams.get(sid) is not stream or stream.finished or stream.remote_closed:
                del starved[sid]
                continue
            if not self._grant(stream):
                return

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
                stream.inbox.put(raw, 5 + size)
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
        if not inflater.eof:
            self._stream_error(stream, _INTERNAL, "the compressed message is truncated")
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
        self.release(stream, stream.held)  # the handler has it now
        deserialize = stream.handler.request_deserializer
        try:
            request = raw if deserialize is None else deserialize(raw)
        except Exception as exc:
            self._stream_error(stream, _INVALID_ARGUMENT, unparsable(exc))
            return
        self._start(stream, request)

    def _start(self, stream: Stream, request: Any) -> None:
        handler = stream.handler
        run = run_unary if handler.unary_unary is not None else run_streaming
        task = self.loop.create_task(run(stream, handler, request))
        stream.task = task
        self.running += 1
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.running -= 1

    # ---- ending ----------------------------------------------------------------------------

    def close_gracefully(self) -> None:
        """GOAWAY in two steps (RFC 9113 6.8): "no more streams" at once, then, once a PING
        has made the round trip (so every stream the client sent before it is here), the last
        stream this connection answers. The connection closes once those have finished."""
        if self._closed or self._draining or self.going_away:
            return
        self._draining = True
        self.write(f.goaway(f.MAX_WINDOW, f.NO_ERROR) + f.frame(f.PING, 0, 0, _GOAWAY_PING))
        self._timers.append(self.loop.call_later(LINGER_S, self._last_goaway))

    def _last_goaway(self) -> None:
        if self._closed or self.going_away:
            return
        self.going_away = True
        self.write(f.goaway(self.last_stream, f.NO_ERROR))
        if self._flush is None and not self._receiving:
            self._flush = self.loop.call_soon(self._write_out)

    def abort(self) -> None:
        """End what is still running (UNAVAILABLE) and close."""
        if self._closed:
            return
        self.going_away = True
        for stream in list(self.streams.values()):
            if not stream.finished:
                stream.finish(_UNAVAILABLE, "the server is shutting down")
            stream.stop()
        self._write_out()
        self._close()

    def _linger(self) -> None:
        """Nothing left to answer after the last GOAWAY: stop reading frames, send our FIN,
        drop what still arrives, close when the peer does or after LINGER_S."""
        if self._lingering or self._closed or self.transport is None:
            return
        self._lingering = True
        transport = self.transport
        try:
            if transport.can_write_eof():
                transport.write_eof()
            transport.resume_reading()  # drained and dropped, so the close resets nothing
        except (OSError, RuntimeError):
            pass
        self._timers.append(self.loop.call_later(LINGER_S, self._linger_due, 20))

    def _linger_due(self, tries: int) -> None:
        """Close, once what we wrote has left (checked every 0.1 s, `tries` more times)."""
        transport = self.transport
        if transport is not None and tries > 0 and transport.get_write_buffer_size():
            self._timers.append(self.loop.call_later(0.1, self._linger_due, tries - 1))
            return
        self._close()

    def _fail(self, code: int, message: str) -> None:
        log.info("gRPC connection from %s: %s (GOAWAY %d)", self.peer, message, code)
        self.going_away = True
        self.write(f.goaway(self.last_stream, code, message.encode("utf-8")[:256]))
        for stream in list(self.streams.values()):
            stream.reset()
        self._write_out()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            self.transport.close()
