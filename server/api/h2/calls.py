"""Running one gRPC call of the native transport: the ServicerContext a handler gets, the
iterator its request messages arrive on, and one runner per RPC kind.

The handlers are grpc's own `RpcMethodHandler`s (what `grpc.unary_unary_rpc_method_handler`
and the generated `add_*Servicer_to_server` functions build), so every servicer written for
grpc.aio runs unchanged: coroutines, async generators, or coroutines writing with
`context.write`. The context implements the grpc.aio ServicerContext methods servicers use
(metadata, deadline, abort, codes and details, initial and trailing metadata, read and write,
peer, done callbacks); `auth_context` and compression settings answer as a server without
them does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from server.api.status import details

if TYPE_CHECKING:
    from server.api.h2.connection import Stream

log = logging.getLogger(__name__)

_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]


class AbortError(Exception):
    """Raised by `context.abort` once the call's status is sent (grpc.aio's rule: the handler
    stops there)."""


class Inbox:
    """A call's request messages, in order, as they arrive; ends when the client half-closes
    (or the call ends). Iterated by streaming handlers, read by `context.read`. `taken` is
    told the wire size of each message the handler takes (the connection then reopens the
    stream's window: a handler that reads slowly holds its client back)."""

    __slots__ = ("_ended", "_messages", "_taken", "_waiter", "deserialize", "queued")

    def __init__(
        self, deserialize: Callable[[bytes], Any] | None, taken: Callable[[int], None]
    ) -> None:
        self._messages: deque[tuple[bytes, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._taken = taken
        self.deserialize = deserialize
        self.queued = 0  # wire bytes waiting for the handler

    def put(self, message: bytes, wire: int) -> None:
        self._messages.append((message, wire))
        self.queued += wire
        self._wake()

    def end(self) -> None:
        self._ended = True
        self._wake()

    def drop(self) -> None:
        """The call is over: what waits is thrown away, the handler reads the end."""
        self._messages.clear()
        self.queued = 0
        self.end()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_raw(self) -> bytes | None:
        """The next message's bytes, None once the client's side is closed."""
        while not self._messages:
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message, wire = self._messages.popleft()
        self.queued -= wire
        self._taken(wire)
        return message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            raw = await self.next_raw()
            if raw is None:
                return
            yield self.parse(raw)

    def parse(self, raw: bytes) -> Any:
        if self.deserialize is None:
            return raw
        try:
            return self.deserialize(raw)
        except Exception as exc:
            raise NotAMessage(unparsable(exc)) from exc


class NotAMessage(Exception):
    """A request message that does not parse as the method's request type."""


def unparsable(exc: BaseException) -> str:
    return details(f"the request is not a valid message of this method: {exc}")


class ServicerContext:
    """What a handler sees of its call (grpc.aio's ServicerContext, the parts servicers use)."""

    __slots__ = ("_callbacks", "_code", "_details", "_trailing", "serialize", "stream")

    def __init__(self, stream: Stream, serialize: Callable[[Any], bytes] | None) -> None:
        self.stream = stream
        self.serialize = serialize
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, Any]] = ()
        self._callbacks: list[Callable[[Any], None]] | None = None

    # ---- what the call carries -------------------------------------------------------------

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self.stream.metadata

    def time_remaining(self) -> float | None:
        deadline = self.stream.deadline
        if deadline is None:
            return None
        return max(0.0, deadline - self.stream.conn.loop.time())

    def peer(self) -> str:
        return self.stream.conn.peer

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, Any]:
        return {}

    def cancelled(self) -> bool:
        return self.stream.cancelled

    def done(self) -> bool:
        return self.stream.finished

    # ---- how it ends -----------------------------------------------------------------------

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if code == grpc.StatusCode.OK:
            log.error("abort() called with StatusCode.OK; sending UNKNOWN instead")
            code = grpc.StatusCode.UNKNOWN
        self.stream.finish(code.value[0], details, trailing_metadata or self._trailing)
        raise AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Sequence[tuple[str, Any]]:
        return self._trailing

    def set_compression(self, compression: Any) -> None:
        """Replies go uncompressed (a client must accept identity)."""

    def disable_next_message_compression(self) -> None:
        """Replies go uncompressed already."""

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    def run_callbacks(self) -> None:
        for callback in self._callbacks or ():
            try:
                callback(self)
            except Exception:
                log.exception("a gRPC call's done callback failed")

    # ---- messages --------------------------------------------------------------------------

    async def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, Any]]) -> None:
        self.stream.send_headers(initial_metadata)

    async def write(self, message: Any) -> None:
        data = message if self.serialize is None else self.serialize(message)
        waiting = self.stream.send_message(data)
        if waiting is not None:
            await waiting

    async def read(self) -> Any:
        inbox = self.stream.inbox
        assert inbox is not None
        raw = await inbox.next_raw()
        if raw is None:
            return grpc.aio.EOF
        return inbox.parse(raw)

    # ---- the end of a call whose handler returned -----------------------------------------

    def close(self) -> None:
        """The handler returned: OK, or the code it set."""
        code = self._code
        if code is None or code == grpc.StatusCode.OK:
            self.stream.finish(0, "", self._trailing)
        else:
            self.stream.finish(code.value[0], self._details, self._trailing)


async def _resolve(result: Any) -> Any:
    return await result if hasattr(result, "__await__") else result


async def run_unary(stream: Stream, handler: grpc.RpcMethodHandler, request: Any) -> None:
    """unary-unary: one request, one reply."""
    context = ServicerContext(stream, handler.response_serializer)
    stream.context = context
    try:
        reply = handler.unary_unary(request, context)
        if hasattr(reply, "__await__"):
            reply = await reply
        if stream.finished:
            return
        code = context._code
        if code is not None and code != grpc.StatusCode.OK:
            context.close()  # grpc.aio's rule: a code set by the handler wins over its reply
            return
        serialize = handler.response_serializer
        stream.reply(reply if serialize is None else serialize(reply), context._trailing)
    except AbortError:
        pass
    except asyncio.CancelledError:
        pass  # the client cancelled, its deadline passed, or the connection went
    except Exception as exc:
        _failed(stream, exc)
    finally:
        stream.ended()
        context.run_callbacks()


async def run_streaming(stream: Stream, handler: grpc.RpcMethodHandler, request: Any) -> None:
    """Every other kind: unary-stream (request given), stream-unary and stream-stream (the
    messages come through the stream's inbox)."""
    context = ServicerContext(stream, handler.response_serializer)
    stream.context = context
    inbox = stream.inbox
    serialize = handler.response_serializer
    result: Any = None
    try:
        if handler.unary_stream is not None:
            result = handler.unary_stream(request, context)
        elif handler.stream_unary is not None:
            assert inbox is not None
            result = handler.stream_unary(aiter(inbox), context)
        else:
            assert inbox is not None
            result = handler.stream_stream(aiter(inbox), context)
        if hasattr(result, "__aiter__"):
            async for reply in result:
                if stream.finished:
                    break
                waiting = stream.send_message(reply if serialize is None else serialize(reply))
                if waiting is not None:
                    await waiting
        elif hasattr(result, "__next__"):
            # A plain generator (grpc.aio runs those in its thread pool): run inline, each
            # reply sent as it comes.
            for reply in result:
                if stream.finished:
                    break
                waiting = stream.send_message(reply if serialize is None else serialize(reply))
                if waiting is not None:
                    await waiting
        else:
            reply = await _resolve(result)
            if handler.stream_unary is not None and not stream.finished and reply is not None:
                stream.send_message(reply if serialize is None else serialize(reply))
        if not stream.finished:
            context.close()
    except AbortError:
        pass
    except asyncio.CancelledError:
        pass
    except NotAMessage as exc:
        stream.finish(_INVALID_ARGUMENT, str(exc))
    except Exception as exc:
        _failed(stream, exc)
    finally:
        try:
            if hasattr(result, "aclose"):
                await result.aclose()  # the handler's own cleanup
            elif hasattr(result, "__next__") and hasattr(result, "close"):
                result.close()
        except Exception:
            log.exception("a gRPC stream handler failed while closing")
        finally:
            stream.ended()
            context.run_callbacks()


def _failed(stream: Stream, exc: Exception) -> None:
    """What grpc.aio answers a handler's unexpected exception with: the code the handler
    set, if it set one, else UNKNOWN naming the exception."""
    if stream.finished:
        return
    context = stream.context
    code = None if context is None else context.code()
    if code is not None and code != grpc.StatusCode.OK:
        assert context is not None
        stream.finish(code.value[0], context.details(), context.trailing_metadata())
        return
    log.exception("unexpected %s in a gRPC call", type(exc).__name__, exc_info=exc)
    stream.finish(_UNKNOWN, details(f"Unexpected {type(exc)}: {exc}"))
