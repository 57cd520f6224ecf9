"""Drive calls over grpc.aio on uvloop: worker coroutines, pacing, per-process shares.

Per call the hot loop does: take a ticket, read the clock, send pre-serialised bytes, read the
clock, append one int. Nothing is (de)serialised except streaming replies that may carry an
in-band error. ``--procs P`` runs P spawned processes, each with its share of concurrency,
connections, calls and rate; they connect and warm up, start together at a barrier, and their
results are merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue as queue_mod
import resource
import threading
import time
import traceback
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from multiprocessing.synchronize import Barrier
from typing import Any

import grpc
import numpy as np
import uvloop

from loadtest.options import Options
from loadtest.payload import Method, infer_request_for_model, resolve_call, static_request
from loadtest.stats import ProcessResult, Report, merge, summarise
from server._proto import inference_pb2 as pb

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
STREAM_ERROR = "STREAM_ERROR"
# A ModelStreamInferResponse whose first byte is field 2's tag (infer_response, length-delimited)
# has no error_message: protobuf serialisers write known fields in field-number order.
_INFER_RESPONSE_TAG = 0x12
# Longest a child may wait at the start barrier for its siblings (spawn + connect + warm-up).
_BARRIER_TIMEOUT_S = 600.0
_CHILD_POLL_S = 0.2


class SetupError(Exception):
    """The run could not start (metadata call failed, a load process died)."""


@dataclass(frozen=True)
class _Share:
    """One process's part of the run."""

    concurrency: int
    connections: int
    total: int | None
    skip: int
    rps: float


def run(options: Options) -> Report:
    """Run the load described by ``options`` and return its report.

    Blocks until done; call it from synchronous code (it runs its own uvloop event loop).
    """
    method = resolve_call(options.call, options)
    request = static_request(options, method)
    shares = _shares(options)
    if len(shares) == 1:
        result = uvloop.run(_run_share(options, method, request, shares[0], barrier=None))
    else:
        if request is None:
            request = uvloop.run(_fetch_model_request(options))
        result = merge(_run_processes(options, request, shares))
    return summarise(
        result, call=method.path.lstrip("/"), concurrency=options.concurrency, procs=options.procs
    )


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _shares(options: Options) -> list[_Share]:
    p = options.procs
    measured = None if options.duration_s is not None else options.total - options.skip_first
    totals = _split(measured, p) if measured is not None else [None] * p
    return [
        _Share(concurrency=c, connections=max(1, k), total=t, skip=s, rps=options.rps / p)
        for c, k, t, s in zip(
            _split(options.concurrency, p),
            _split(options.connections, p),
            totals,
            _split(options.skip_first, p),
            strict=True,
        )
    ]


def _channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Without this, channels with equal arguments share one TCP connection.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


async def _connect(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Wait until connected, failed or out of time; calls on a failed channel fail UNAVAILABLE."""
    done = (
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    )
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            state = channel.get_state(try_to_connect=True)
            while state not in done:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)


async def _model_request(channel: grpc.aio.Channel, options: Options) -> bytes:
    assert options.model is not None
    metadata_call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelMetadata",
        request_serializer=pb.ModelMetadataRequest.SerializeToString,
        response_deserializer=pb.ModelMetadataResponse.FromString,
    )
    try:
        metadata = await metadata_call(
            pb.ModelMetadataRequest(name=options.model, version=options.model_version),
            timeout=options.connect_timeout_s,
        )
    except grpc.aio.AioRpcError as e:
        raise SetupError(
            f"--model: ModelMetadata({options.model!r}) failed: {e.code().name}: {e.details()}"
        ) from e
    request = infer_request_for_model(
        metadata,
        rows=options.rows,
        version=options.model_version,
        typed=options.typed,
        traffic="" if options.live else "loadtest",
    )
    return request.SerializeToString()


async def _fetch_model_request(options: Options) -> bytes:
    channel = _channel(options.target)
    try:
        await _connect(channel, options.connect_timeout_s)
        return await _model_request(channel, options)
    finally:
        await channel.close()


async def _run_share(
    options: Options,
    method: Method,
    request: bytes | None,
    share: _Share,
    barrier: Barrier | None,
) -> ProcessResult:
    channels = [_channel(options.target) for _ in range(share.connections)]
    try:
        await asyncio.gather(*(_connect(ch, options.connect_timeout_s) for ch in channels))
        if request is None:
            request = await _model_request(channels[0], options)
        if share.skip:
            await _phase(channels, method, request, options, replace(share, total=share.skip), None)
        if barrier is not None:
            await asyncio.to_thread(barrier.wait, _BARRIER_TIMEOUT_S)
        return await _phase(channels, method, request, options, share, options.duration_s)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


class _Budget:
    """Tickets for calls: a count, and in duration mode a stop time too."""

    __slots__ = ("left", "stop_ns")

    def __init__(self, total: int | None, duration_s: float | None) -> None:
        self.left = total if total is not None else 1 << 62
        self.stop_ns = (
            time.perf_counter_ns() + int(duration_s * 1e9) if duration_s is not None else 0
        )

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return self.stop_ns == 0 or time.perf_counter_ns() < self.stop_ns


class _Pacer:
    """Scheduled send times ``start + i / rps`` shared by a process's workers.

    A fixed schedule (rather than "one interval after the previous send") keeps the mean rate
    exact even though event-loop timers are coarse; a worker that is late sends at once.
    """

    __slots__ = ("interval_ns", "next_ns")

    def __init__(self, rps: float) -> None:
        self.interval_ns = 1e9 / rps
        self.next_ns = float(time.perf_counter_ns())

    async def wait(self) -> None:
        slot = self.next_ns
        self.next_ns = slot + self.interval_ns
        delay_ns = slot - time.perf_counter_ns()
        if delay_ns > 0:
            await asyncio.sleep(delay_ns / 1e9)


class _Tally:
    """Per-process counters; the success path touches only ``latencies``."""

    __slots__ = ("errors", "latencies", "status")

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.status: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def fail(self, code: str, message: str) -> None:
        self.status[code] = self.status.get(code, 0) + 1
        self.errors[message] = self.errors.get(message, 0) + 1

    def fail_rpc(self, code: grpc.StatusCode | None, details: str | None) -> None:
        # A stream the server ended with OK before replying failed all the same.
        name = STREAM_ERROR if code is None or code is grpc.StatusCode.OK else code.name
        self.fail(name, f"{name}: {details}")


class _StreamSlot:
    """One streaming worker's call, watched for the per-message deadline."""

    __slots__ = ("call", "expired", "sent_ns")

    def __init__(self) -> None:
        self.call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None
        self.sent_ns = 0
        self.expired = False


async def _phase(
    channels: list[grpc.aio.Channel],
    method: Method,
    request: bytes,
    options: Options,
    share: _Share,
    duration_s: float | None,
) -> ProcessResult:
    timeout = options.timeout_s or None
    tally = _Tally()
    cpu0 = _cpu_seconds()
    start_ns = time.monotonic_ns()
    budget = _Budget(share.total, duration_s)
    pacer = _Pacer(share.rps) if share.rps > 0 else None
    watchdog: asyncio.Task[None] | None = None
    workers: list[Coroutine[Any, Any, None]]
    if method.streaming:
        slots = [_StreamSlot() for _ in range(share.concurrency)]
        open_stream = [ch.stream_stream(method.path) for ch in channels]
        workers = [
            _stream_worker(open_stream[i % len(channels)], request, budget, pacer, tally, slot)
            for i, slot in enumerate(slots)
        ]
        if timeout is not None:
            watchdog = asyncio.create_task(_watch_streams(slots, timeout))
    else:
        calls = [ch.unary_unary(method.path) for ch in channels]
        workers = [
            _unary_worker(calls[i % len(channels)], request, timeout, budget, pacer, tally)
            for i in range(share.concurrency)
        ]
    try:
        # A TaskGroup, not gather: an unexpected error in one worker stops the others.
        async with asyncio.TaskGroup() as group:
            for worker in workers:
                group.create_task(worker)
    finally:
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
    end_ns = time.monotonic_ns()
    status = dict(tally.status)
    if tally.latencies:
        status["OK"] = len(tally.latencies)
    return ProcessResult(
        latencies_ns=np.array(tally.latencies, dtype=np.int64),
        status_counts=status,
        error_counts=tally.errors,
        start_ns=start_ns,
        end_ns=end_ns,
        cpu_seconds=_cpu_seconds() - cpu0,
    )


async def _unary_worker(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    request: bytes,
    deadline_s: float | None,
    budget: _Budget,
    pacer: _Pacer | None,
    tally: _Tally,
) -> None:
    take = budget.take
    append = tally.latencies.append
    clock = time.perf_counter_ns
    while take():
        if pacer is not None:
            await pacer.wait()
        t0 = clock()
        try:
            await call(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as e:
            tally.fail_rpc(e.code(), e.details())
            continue
        append(clock() - t0)


async def _stream_worker(
    open_stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes],
    request: bytes,
    budget: _Budget,
    pacer: _Pacer | None,
    tally: _Tally,
    slot: _StreamSlot,
) -> None:
    """One bidirectional stream; the next request goes when the previous reply has arrived."""
    take = budget.take
    append = tally.latencies.append
    clock = time.perf_counter_ns
    call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None
    while take():
        if pacer is not None:
            await pacer.wait()
        if call is None:
            call = slot.call = open_stream()
        t0 = slot.sent_ns = clock()
        try:
            await call.write(request)
            reply = await call.read()
        except grpc.aio.AioRpcError as e:
            tally.fail_rpc(e.code(), e.details())
            call = None
            _drop(slot)
            continue
        except asyncio.InvalidStateError:
            # The stream had already ended (e.g. the server closed it) before this write.
            tally.fail_rpc(await call.code(), await call.details())
            call = None
            _drop(slot)
            continue
        except asyncio.CancelledError:
            # The watchdog cancels the call (not this task) when a reply is overdue.
            task = asyncio.current_task()
            if not slot.expired or (task is not None and task.cancelling()):
                raise
            tally.fail(
                "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED: no stream reply within -t/--timeout"
            )
            call = None
            _drop(slot)
            continue
        t1 = clock()
        slot.sent_ns = 0
        if reply is grpc.aio.EOF:
            tally.fail_rpc(await call.code(), "stream ended before the reply")
            call = None
            _drop(slot)
            continue
        if reply and reply[0] != _INFER_RESPONSE_TAG:
            error = pb.ModelStreamInferResponse.FromString(reply).error_message
            if error:
                tally.fail(STREAM_ERROR, error)
                continue
        append(t1 - t0)
    if call is not None:
        await _close_stream(call)
        _drop(slot)


def _drop(slot: _StreamSlot) -> None:
    slot.call = None
    slot.sent_ns = 0
    slot.expired = False


async def _close_stream(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> None:
    """Half-close and let the server finish the stream, rather than cancelling it."""
    try:
        async with asyncio.timeout(5.0):
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
    except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
        call.cancel()


async def _watch_streams(slots: list[_StreamSlot], timeout_s: float) -> None:
    timeout_ns = int(timeout_s * 1e9)
    period = min(max(timeout_s / 4, 0.001), 0.5)
    while True:
        await asyncio.sleep(period)
        now = time.perf_counter_ns()
        for slot in slots:
            if slot.call is not None and slot.sent_ns and now - slot.sent_ns > timeout_ns:
                slot.expired = True
                slot.call.cancel()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_processes(options: Options, request: bytes, shares: list[_Share]) -> list[ProcessResult]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(shares))
    results: mp.Queue[tuple[str, Any]] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child_main,
            args=(options, request, share, barrier, results),
            name=f"loadtest-{i}",
            daemon=True,
        )
        for i, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    collected: list[ProcessResult] = []
    try:
        while len(collected) < len(procs):
            try:
                kind, value = results.get(timeout=_CHILD_POLL_S)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise SetupError(
                        f"{dead[0].name} exited with code {dead[0].exitcode}"
                    ) from None
                continue
            if kind == "error":
                raise SetupError(str(value))
            collected.append(value)
    except BaseException:
        barrier.abort()
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return collected


def _child_main(
    options: Options,
    request: bytes,
    share: _Share,
    barrier: Barrier,
    results: mp.Queue[tuple[str, Any]],
) -> None:
    try:
        method = resolve_call(options.call, options)
        result = uvloop.run(_run_share(options, method, request, share, barrier))
    except threading.BrokenBarrierError:
        results.put(("error", "a sibling load process failed before the start"))
    except Exception as e:
        results.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    else:
        results.put(("ok", result))
