"""More than one outstanding request for new calls in grpc.aio, so gRPC keeps its share of the
event loop beside the REST binding.

grpc.aio's server asks gRPC core for the next call of each registered method one at a time
(`AioServer._server_main_loop`: one `grpc_server_request_registered_call` per method, the next
one only after the last has been handed to a task). Each accepted call goes through a chain of
event-loop turns: the completion queue's poller thread wakes the loop through a socket, the
reader callback completes the request's future, its task finishes, `asyncio.wait` wakes the
main loop, which starts the RPC's task and asks core for the next call. So a process accepts at
most one ModelInfer call per ~4 loop turns. Alone, gRPC's turns are short and this is invisible;
beside HTTP/1.1, whose every connection is read in the same turn, a turn serves dozens of REST
requests and gRPC got ~1/25 of HTTP's req/s (32 + 32 perf_analyzer clients on the 2-core
machine; 0.10 with the acceptor, 0.26 with the REST turn budget on top, server/api/http/
fairness.py). Fewer REST requests per turn alone barely helped: the chain stayed serial.

`CallAcceptor` keeps `depth` more requests outstanding for the hot methods (server.py) and
starts each accepted call's task from the request's done-callback: up to `depth` calls are
accepted per chain instead of one. Core hands each incoming call to whichever request is
outstanding, so about one call in `depth + 1` still reaches grpc.aio's own loop and runs there.

It uses grpc.aio's private cygrpc entry points (there is no public knob); `supported()` says
whether the installed grpcio has them, `start()` does nothing (logs once) when it does not, and
a test fails on a grpcio whose internals moved, so an upgrade cannot drop the fix silently.
`maximum_concurrent_rpcs` is counted by grpc.aio's main loop alone: with it set, the acceptor
stays off so that limit keeps holding.

Unary calls it accepts it also runs itself (`_serve_unary`), with the same core operations as
grpc.aio and less around them: receive the message, deserialize, await the handler with a real
grpc.aio ServicerContext (deadline, metadata, abort all work as usual), send initial metadata,
the reply and the status in one batch. A call still running WATCH_AFTER_S after it was
accepted gets a second batch that waits for the client's close and cancels the handler if the
client went away or its deadline passed, as grpc.aio does for every call; one answered sooner
takes the close in its final batch instead (a completion fewer: +4-28 % churn unary req/s in
three pairs, median +7 %). Left out, because
batchline's unary handlers use none of it: handler lookup per call (the handler is known), the
per-call inspection of whether the handler is a coroutine, gRPC's census context, status codes
set with `context.set_code` (a handler answers or aborts), trailing metadata set with
`context.set_trailing_metadata`, `context.set_compression`, `context.add_done_callback`. A
message that does not parse is INVALID_ARGUMENT here (grpc.aio's own path, for the calls it
takes or with the acceptor off, answers UNKNOWN naming the parse error). That
per-call machinery cost batchline 4-13 % of its unary req/s (perf_analyzer, churn, c=64, one
core). Bidirectional calls (ModelStreamInfer) it runs the same way (`_serve_stream`): the
handler's async generator gets an iterator that reads each message straight from core, and each
reply after the first is one send operation, without grpc.aio's reader and writer layers around
each. Handlers that need what is left out go through grpc.aio: leave them out of HOT_METHODS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from grpc._cython import cygrpc

from server.api.status import details

log = logging.getLogger(__name__)

# Outstanding requests per method: at least the concurrency one process is expected to serve
# on a hot method (each costs one preallocated call slot in core, nothing per turn).
DEFAULT_DEPTH = 64
# A unary call still running this long after it was accepted gets a watcher for the client's
# cancel (or core's, at the deadline), which cancels it, so a queued request whose caller left
# never reaches the model. One answered sooner does without: its close completes with the reply,
# one completion (a hand-off through gRPC's poller thread) fewer per call.
WATCH_AFTER_S = 0.010

_NEEDED = (
    "_handle_rpc",
    "_schedule_rpc_coro",
    "_MethodResolver",
    "_RequestCallError",
    "_receive_message",
    "_ServicerContext",
    "execute_batch",
    "ExecuteBatchError",
    "AbortError",
    "SendInitialMetadataOperation",
    "SendMessageOperation",
    "SendStatusFromServerOperation",
    "ReceiveCloseOnServerOperation",
)
_NO_FLAGS = 0
_NO_METADATA: tuple[Any, ...] = ()
_OK = grpc.StatusCode.OK.value[0]


def supported() -> bool:
    """Whether this grpcio has the internals the acceptor drives."""
    return all(hasattr(cygrpc, name) for name in _NEEDED) and hasattr(
        cygrpc.AioServer, "_make_request_call_future"
    )


class CallAcceptor:
    """Keeps `depth` extra requests for new calls of each of `methods` outstanding on a started
    grpc.aio server; a unary or bidirectional call core hands to one it runs itself (see the
    module docstring), any other kind as grpc.aio's own loop would run it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        methods: Mapping[str, grpc.RpcMethodHandler],
        *,
        depth: int = DEFAULT_DEPTH,
    ) -> None:
        self._server = server
        # fully qualified method ("/pkg.Service/Method") -> its handler
        self._methods = dict(methods)
        self._depth = depth
        self._aio: Any = None
        self._resolver: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unary: set[asyncio.Task[Any]] = set()  # the unary calls among _tasks
        self._watchers: set[asyncio.Task[Any]] = set()  # each call's close watcher
        self.accepted = 0  # calls started through the acceptor (read by tests and benches)
        self.watched = 0  # of those, calls that got a close watcher

    @property
    def active(self) -> bool:
        return self._aio is not None

    @property
    def in_flight(self) -> int:
        """Unary calls it accepted that have not finished (an open stream, idle or not, is
        not counted: the REST turn budget reads this to see gRPC calls waiting)."""
        return len(self._unary)

    def start(self) -> bool:
        """After `server.start()`: put the extra requests in; False when left off."""
        if self._depth <= 0 or not self._methods:
            return False
        aio = getattr(self._server, "_server", None)
        if not supported() or aio is None or not aio.is_running():
            log.warning(
                "grpc.aio internals not as expected (grpcio %s): gRPC accepts one call per "
                "method at a time, and may get a small share of the loop beside HTTP",
                grpc.__version__,
            )
            return False
        self._aio = aio
        self._loop = asyncio.get_running_loop()
        self._resolver = cygrpc._MethodResolver([], self._methods)
        for method in self._methods:
            for _ in range(self._depth):
                self._arm(method.encode())
        return True

    def _arm(self, method: bytes) -> None:
        future = self._aio._make_request_call_future(method)
        self._pending.add(future)
        future.add_done_callback(lambda f: self._accepted(f, method))

    def _accepted(self, future: asyncio.Future[Any], method: bytes) -> None:
        self._pending.discard(future)
        if future.cancelled():
            return
        running = self._aio.is_running()
        exc = future.exception()
        if exc is not None:
            # Core fails outstanding requests when the server shuts down; anything else is a
            # request that can be put in again, as grpc.aio's main loop does.
            if isinstance(exc, cygrpc._RequestCallError):
                if running:
                    self._arm(method)
            else:
                log.error("gRPC request for a new %s call failed: %r", method.decode(), exc)
            return
        rpc_state = future.result()
        name = method.decode()
        loop = self._loop
        assert loop is not None
        handler = self._methods[name]
        serve = (
            self._serve_unary
            if handler.unary_unary is not None
            else self._serve_stream
            if handler.stream_stream is not None
            else None
        )
        if serve is not None:
            call = _Call(rpc_state)
            task = loop.create_task(serve(handler, call))
            call.task = task
            if handler.unary_unary is not None:
                self._unary.add(task)
                task.add_done_callback(self._unary.discard)
                call.timer = loop.call_later(WATCH_AFTER_S, self._watch, call)
            else:
                self._watch(call)
        else:
            coro = cygrpc._handle_rpc(name, self._resolver, (), rpc_state, loop, False)
            task = loop.create_task(cygrpc._schedule_rpc_coro(coro, rpc_state, loop, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.accepted += 1
        if running:
            self._arm(method)

    def _watch(self, call: _Call) -> None:
        """Start the call's close watcher, unless the call is already finishing."""
        call.timer = None
        task = call.task
        if call.finishing or task is None or task.done():
            return
        loop = self._loop
        assert loop is not None
        call.watching = True
        self.watched += 1
        watcher = loop.create_task(_cancel_when_closed(call, loop))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _serve_unary(self, handler: grpc.RpcMethodHandler, call: _Call) -> None:
        """One unary call, start to end (see the module docstring for what differs); a watcher
        started once it has run WATCH_AFTER_S cancels it if the client's side ends first."""
        loop = self._loop
        assert loop is not None
        rpc_state = call.rpc_state
        try:
            raw = await cygrpc._receive_message(rpc_state, loop)
            if raw is None:
                return  # the call ended before its message arrived
            try:
                request = handler.request_deserializer(raw)
            except Exception as exc:
                await _send_status(call, grpc.StatusCode.INVALID_ARGUMENT, _unparsable(exc), loop)
                return
            context = cygrpc._ServicerContext(rpc_state, None, None, loop)
            try:
                reply = await handler.unary_unary(request, context)
            except cygrpc.AbortError:
                return  # context.abort sent the status
            message = handler.response_serializer(reply)
            call.finishing = True
            ops: tuple[Any, ...] = (
                _initial_metadata(),
                cygrpc.SendMessageOperation(message, _NO_FLAGS),
                cygrpc.SendStatusFromServerOperation(_NO_METADATA, _OK, "", _NO_FLAGS),
            )
            if not call.watching:
                # Nobody waits for the client's close: it completes with the reply (one
                # completion fewer for a call answered within WATCH_AFTER_S).
                ops += (cygrpc.ReceiveCloseOnServerOperation(_NO_FLAGS),)
            await cygrpc.execute_batch(rpc_state, ops, loop)
        except asyncio.CancelledError:
            pass  # the client went away or its deadline passed: core has ended the call
        except cygrpc.ExecuteBatchError as exc:
            _ended(exc)
        except Exception as exc:
            log.exception("unexpected %s in a gRPC call", type(exc).__name__)
            await _send_unknown(call, exc, loop)
        finally:
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None

    async def _serve_stream(self, handler: grpc.RpcMethodHandler, call: _Call) -> None:
        """One bidirectional call: the handler (an async generator) gets an iterator reading
        each message straight from core; its first reply goes through the ServicerContext (so
        grpc.aio knows the initial metadata went, and a later context.abort works), each one
        after it is one send operation, as grpc.aio sends them."""
        loop = self._loop
        assert loop is not None
        rpc_state = call.rpc_state
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer

        async def requests() -> AsyncIterator[Any]:
            while True:
                raw = await cygrpc._receive_message(rpc_state, loop)
                if raw is None:
                    return  # the client closed its side (or the call ended)
                try:
                    request = deserialize(raw)
                except Exception as exc:
                    raise _NotAMessage(_unparsable(exc)) from exc
                yield request

        context = cygrpc._ServicerContext(rpc_state, deserialize, serialize, loop)
        replies = handler.stream_stream(requests(), context)
        opened = False
        try:
            async for reply in replies:
                if opened:
                    message = cygrpc.SendMessageOperation(serialize(reply), _NO_FLAGS)
                    await cygrpc.execute_batch(rpc_state, (message,), loop)
                else:
                    await context.write(reply)
                    opened = True
            call.finishing = True
            end = cygrpc.SendStatusFromServerOperation(_NO_METADATA, _OK, "", _NO_FLAGS)
            await cygrpc.execute_batch(
                rpc_state, (end,) if opened else (_initial_metadata(), end), loop
            )
        except cygrpc.AbortError:
            pass  # context.abort sent the status
        except asyncio.CancelledError:
            pass  # the client went away or its deadline passed: core has ended the call
        except cygrpc.ExecuteBatchError as exc:
            _ended(exc)
        except _NotAMessage as exc:
            await _send_status(call, grpc.StatusCode.INVALID_ARGUMENT, str(exc), loop, opened)
        except Exception as exc:
            log.exception("unexpected %s in a gRPC stream", type(exc).__name__)
            await _send_unknown(call, exc, loop, opened)
        finally:
            try:
                await replies.aclose()  # the handler's own cleanup (its pending requests)
            except Exception:
                log.exception("a gRPC stream handler failed while closing")

    async def stop(self) -> None:
        """After `server.stop()`: withdraw what is still outstanding, wait for the RPCs it
        started (the server's stop has already ended or cancelled them)."""
        pending = list(self._pending)
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._watchers:
            await asyncio.gather(*list(self._watchers), return_exceptions=True)
        self._aio = None


class _Call:
    """One call the acceptor runs: core's state, its task, whether its close watcher runs (or
    the timer that starts it), and whether its final batch (the status) has started, after
    which a cancel would only interrupt that batch (grpc.aio's rule too: it cancels a call's
    task only while no status has been sent)."""

    __slots__ = ("finishing", "rpc_state", "task", "timer", "watching")

    def __init__(self, rpc_state: Any) -> None:
        self.rpc_state = rpc_state
        self.task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.watching = False
        self.finishing = False


async def _cancel_when_closed(call: _Call, loop: asyncio.AbstractEventLoop) -> None:
    """Wait for the client's side of the call to end; cancel the call's task if it ended by a
    cancel (the client's, or core's when the deadline passed) while the task still runs and has
    not begun sending its status."""
    close = cygrpc.ReceiveCloseOnServerOperation(_NO_FLAGS)
    with contextlib.suppress(cygrpc.ExecuteBatchError):
        await cygrpc.execute_batch(call.rpc_state, (close,), loop)
    task = call.task
    if close.cancelled() and task is not None and not task.done() and not call.finishing:
        task.cancel()


def _ended(exc: BaseException) -> None:
    """An operation failed: the call ended under it (client gone, server stopping), or core
    refused to start it, which is a bug worth seeing (the call then ends at its deadline or at
    shutdown)."""
    if str(exc).startswith("Failed grpc_call_start_batch"):
        log.error("gRPC core refused an operation of a call: %s", exc)


def _unparsable(exc: BaseException) -> str:
    return details(f"the request is not a valid message of this method: {exc}")


async def _send_unknown(
    call: _Call, exc: BaseException, loop: asyncio.AbstractEventLoop, opened: bool = False
) -> None:
    """What grpc.aio answers a handler's unexpected exception with."""
    message = details(f"Unexpected {type(exc)}: {exc}")
    await _send_status(call, grpc.StatusCode.UNKNOWN, message, loop, opened)


class _NotAMessage(Exception):
    """A stream's request that does not parse as the method's message."""


def _initial_metadata() -> Any:
    return cygrpc.SendInitialMetadataOperation(_NO_METADATA, _NO_FLAGS)


async def _send_status(
    call: _Call,
    code: grpc.StatusCode,
    message: str,
    loop: asyncio.AbstractEventLoop,
    opened: bool = False,
) -> None:
    """End the call with `code` (with the initial metadata unless `opened` sent it); a call
    that ended meanwhile has nobody left to tell."""
    call.finishing = True
    end = cygrpc.SendStatusFromServerOperation(_NO_METADATA, code.value[0], message, _NO_FLAGS)
    with contextlib.suppress(cygrpc.ExecuteBatchError, asyncio.CancelledError):
        await cygrpc.execute_batch(
            call.rpc_state, (end,) if opened else (_initial_metadata(), end), loop
        )
