"""Dynamic batching: one DynamicBatcher per served model version.

The flush decision is a pure function (`decide`) of the queue and the clock; `DynamicBatcher`
applies it on the event loop without a task of its own: a submit schedules a flush for the end of
the current loop tick (so the requests that arrived in one tick travel together), and a finished
batch schedules the next. Learned from MLServer and Ray Serve, and unlike them:

- rows are counted, not requests: a batch never exceeds `max_batch_size` rows, and the queue bound
  is in rows too; a full queue rejects at once (ResourceExhausted), it never blocks a caller;
- an instance permit is taken before a batch is cut, so under saturation batches grow instead of
  many tiny batches waiting for a worker;
- work-conserving: a partial batch with a free instance waits for company only while company
  keeps coming. Once the loop has turned `QUIET_TURNS` times without a new request, the batch is
  cut before `max_queue_delay_s` (unless `preferred_batch_sizes` are set: those wait for a size
  or the delay, as Triton's do); the delay bounds the wait when requests trickle in every turn.
  Waiting on a quiet loop only idles the core: under a closed loop of 64 callers on churn it
  kept the server 14-16 % idle (bench/field.py). With `instances` > 1 a quiet loop also sends a
  small batch to a free instance while others run, as Triton's batcher without a delay does;
- cancelled and expired requests are dropped before a batch runs and never reach the model; a
  cancelled caller never affects its batch-mates, and results are set only on futures not done;
- requests whose non-batch dimensions differ are never stacked together.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.clock import Clock
from server.config.batching import BatchPolicy
from server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelError,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Outputs = list[np.ndarray]


@dataclass(frozen=True, slots=True)
class Decision:
    cut: bool
    wake_at: float | None = None


CUT = Decision(cut=True)
HOLD = Decision(cut=False)

# Loop turns without a new request after which a waiting batch is cut. Two, not one: a turn's
# socket reads queue the handlers that will submit, and those run in the next turn, after a
# check scheduled in the same turn as the read. This assumes a request reaches submit in the
# first step of the task its bytes started (true of both gRPC transports and REST; a task hop
# on the way, such as asyncio.wait_for's in 3.11, would let a quiet cut leave it behind).
QUIET_TURNS = 2


def decide(
    policy: BatchPolicy,
    *,
    queued_rows: int,
    oldest_enqueued: float,
    now: float,
    free_instances: int,
    in_flight: int,
    busy: bool = False,
    queued_requests: int = 0,
    crowd: int = 0,
    quiet: bool = False,
) -> Decision:
    """Whether to cut a batch now, and if not, when to look again.

    Eager when idle: with nothing in flight, no preferred size to reach and no sign of
    concurrent traffic (`busy`), a batch is cut at once, so a lone request waits for nothing.
    While other batches run, while traffic is concurrent, or to reach a preferred size, the
    queue may grow for up to `max_queue_delay_s` past its oldest request, but without a
    preferred size, only while requests keep arriving: `quiet` (no new request for
    QUIET_TURNS loop turns) cuts at once.
    """
    if queued_rows == 0 or free_instances == 0:
        return HOLD
    target = max(policy.preferred_batch_sizes, default=policy.max_batch_size)
    if queued_rows >= target or queued_rows >= policy.max_batch_size:
        return CUT
    if (
        policy.preferred_batch_sizes
        and queued_rows in policy.preferred_batch_sizes
        and in_flight == 0
    ):
        return CUT
    if in_flight == 0 and not busy and not policy.preferred_batch_sizes:
        return CUT
    # Closed-loop callers come back together: once the queue again holds as many requests as
    # the last batch served (`crowd`), the ones that were coming have come.
    if crowd > 1 and queued_requests >= crowd and not policy.preferred_batch_sizes:
        return CUT
    if quiet and not policy.preferred_batch_sizes:
        return CUT
    wake_at = oldest_enqueued + policy.max_queue_delay_s
    if now >= wake_at:
        return CUT
    return Decision(cut=False, wake_at=wake_at)


def shape_key(inputs: Arrays) -> tuple[tuple[int, ...], ...]:
    """Requests may share a batch only when every input's non-batch dimensions agree."""
    if len(inputs) == 1:  # the common case, without a generator
        for a in inputs.values():
            return (a.shape[1:],)
    return tuple(a.shape[1:] for a in inputs.values())


def stack(batch: Sequence[Arrays]) -> Arrays:
    """Concatenate the callers' inputs along the batch dimension (no copy for a single caller)."""
    if len(batch) == 1:
        return batch[0]
    first = batch[0]
    return {name: np.concatenate([b[name] for b in batch]) for name in first}


def split_rows(outputs: Outputs, counts: Sequence[int]) -> list[Outputs]:
    """Cut each output back into the callers' rows, in order (views, no copies)."""
    if len(counts) == 1:
        return [outputs]
    parts: list[Outputs] = []
    start = 0
    for rows in counts:
        end = start + rows
        parts.append([out[start:end] for out in outputs])
        start = end
    return parts


class BatchObserver(Protocol):
    """Receives what happened to each batch (statistics, metrics); must not block."""

    def batch_done(
        self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool
    ) -> None: ...

    def dropped(self, reason: str, count: int) -> None: ...


class _NullObserver:
    def batch_done(
        self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool
    ) -> None:
        pass

    def dropped(self, reason: str, count: int) -> None:
        pass


class BatchTracer(Protocol):
    """Records a traced batch: each sampled request's queue wait, one span linked to them all."""

    def batch(
        self,
        traces: Sequence[object],
        enqueued: Sequence[float],
        started: float,
        finished: float,
        rows: int,
        ok: bool,
    ) -> None: ...


class _Entry:
    __slots__ = ("deadline", "enqueued", "future", "inputs", "key", "queued", "rows", "trace")

    def __init__(
        self,
        inputs: Arrays,
        rows: int,
        key: tuple[tuple[int, ...], ...],
        future: asyncio.Future[Outputs],
        deadline: float | None,
        enqueued: float,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued
        self.queued = True
        self.trace: object = None


RunSync = Callable[[Arrays], Outputs]


class DynamicBatcher:
    """Groups concurrent requests for one model version into batches and runs them.

    `run` is the model call (a plain function returning every output, in order). With an
    `executor`, batches run there, `policy.instances` at a time; without one they run inline on
    the event loop, which is cheaper for models that cost microseconds.
    """

    def __init__(
        self,
        name: str,
        run: RunSync,
        policy: BatchPolicy,
        clock: Clock,
        *,
        executor: object | None = None,
        observer: BatchObserver | None = None,
        tracer: BatchTracer | None = None,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.policy = policy
        self._run = run
        self._clock = clock
        self._executor = executor
        self._observer: BatchObserver = observer or _NullObserver()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_rows = 0
        self._in_flight = 0
        self._instances = 1 if executor is None else policy.instances
        self._scheduled = False
        self._busy = False
        self._crowd = 0  # requests in the last batch cut
        self._alone = 0  # unbatched runs in progress (policy.enabled = False)
        self._timer: asyncio.TimerHandle | None = None
        # The quiet watch: its callbacks since the last submit (which resets it; see QUIET_TURNS).
        self._quiet_turns = 0
        self._watch: asyncio.Handle | None = None
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Future[Outputs]] = set()
        # The event loop it serves, bound at the first submit: asyncio.get_running_loop() makes
        # a getpid() system call in CPython 3.11 (its fork check; ~0.25 us measured here).
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- introspection ------------------------------------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ---- the caller's side --------------------------------------------------------------

    async def submit(
        self, inputs: Arrays, rows: int, deadline: float | None = None, trace: object = None
    ) -> Outputs:
        """Run `rows` rows through the model with other callers'; return this caller's rows."""
        if self._closed:
            raise Unavailable(f"model {self.name} is shutting down")
        if rows > self.policy.max_batch_size:
            raise InvalidArgument(
                f"request has {rows} rows; model {self.name} accepts at most "
                f"{self.policy.max_batch_size} (max_batch_size)"
            )
        if not self.policy.enabled:
            return await self._run_alone(inputs, rows)
        limit = self.policy.max_queue_size
        if limit is not None and self._queued_rows + rows > limit:
            self._observer.dropped("queue_full", 1)
            if rows > limit:
                # Not a busy queue: this request can never fit (a small queue sized for
                # shedding, with a larger max_batch_size).
                raise ResourceExhausted(
                    f"request has {rows} rows; the queue for model {self.name} holds at most "
                    f"{limit} (max_queue_size)"
                )
            raise ResourceExhausted(
                f"queue for model {self.name} is full ({self._queued_rows} of {limit} rows waiting)"
            )
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        entry = _Entry(inputs, rows, shape_key(inputs), future, deadline, self._clock.now())
        if trace is not None:
            entry.trace = trace
        self._queue.append(entry)
        self._queued_rows += rows
        self._quiet_turns = 0
        self._idle.clear()
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (client cancel or gRPC deadline): free its rows now; the
            # entry itself is skipped lazily when a batch is cut.
            if entry.queued:
                entry.queued = False
                self._queued_rows -= rows
                self._observer.dropped("cancelled", 1)
                self._check_idle()
            raise

    async def _run_alone(self, inputs: Arrays, rows: int) -> Outputs:
        start = self._clock.now()
        ok = False
        self._alone += 1
        self._idle.clear()
        try:
            if self._executor is None:
                result = self._run(inputs)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, self._run, inputs)  # type: ignore[arg-type]
            ok = True
            return result
        finally:
            self._alone -= 1
            self._observer.batch_done(rows, (0.0,), self._clock.now() - start, ok)
            self._check_idle()

    # ---- the scheduler's side -----------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            assert self._loop is not None  # bound by the submit that queued what is there
            self._loop.call_soon(self._flush)

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _on_turn(self) -> None:
        """One loop turn of the quiet watch. The first callback after a submit ends the turn
        the submit ran in; past that, QUIET_TURNS whole turns without one: look again (the
        flush cuts)."""
        self._quiet_turns += 1
        if self._quiet_turns > QUIET_TURNS:
            self._watch = None
            self._quiet_turns = 0
            self._flush(quiet=True)
            return
        assert self._loop is not None
        self._watch = self._loop.call_soon(self._on_turn)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._quiet_turns = 0

    def _flush(self, quiet: bool = False) -> None:
        """Cut and start what `decide` allows; `quiet`: the watch saw QUIET_TURNS turns
        without a new request (an argument, not state: nothing stale can cut later)."""
        self._scheduled = False
        while True:
            self._drop_dead_head()
            if not self._queue:
                self._stop_watch()
                break
            now = self._clock.now()
            decision = decide(
                self.policy,
                queued_rows=self._queued_rows,
                oldest_enqueued=self._queue[0].enqueued,
                now=now,
                free_instances=self._instances - self._in_flight,
                in_flight=self._in_flight,
                busy=self._busy,
                queued_requests=len(self._queue),
                crowd=self._crowd,
                quiet=quiet,
            )
            if not decision.cut:
                if decision.wake_at is not None:
                    loop = self._loop
                    assert loop is not None
                    if self._timer is None:
                        self._timer = loop.call_later(
                            max(0.0, decision.wake_at - now), self._on_timer
                        )
                    if self._watch is None and not self.policy.preferred_batch_sizes:
                        self._quiet_turns = 0
                        self._watch = loop.call_soon(self._on_turn)
                else:  # held for an instance: a batch's end looks again
                    self._stop_watch()
                break
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._stop_watch()
            batch = self._cut(now)
            if not batch:
                continue
            # Concurrency is evident when a cut finds company; a cut that waited and found
            # none means traffic went quiet, so the next lone request runs at once again.
            self._busy = len(batch) > 1
            self._crowd = len(batch)
            if self._executor is None:
                self._execute_inline(batch, now)
                # Let the loop take in more I/O before the next inline batch.
                if self._queue:
                    self._schedule()
                break
            self._execute_in_executor(batch, now)
        self._check_idle()

    def _drop_dead_head(self) -> None:
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()

    def _cut(self, now: float) -> list[_Entry]:
        """Take entries from the front: same shape key, at most max_batch_size rows."""
        queue = self._queue
        limit = self.policy.max_batch_size
        taken: list[_Entry] = []
        passed_over: list[_Entry] = []
        rows = 0
        key = None
        expired = 0
        while queue:
            entry = queue[0]
            if not entry.queued:
                queue.popleft()
                continue
            if entry.future.done():
                # Cancelled, and this flush ran before the caller's task could see it.
                queue.popleft()
                self._dequeue(entry)
                self._observer.dropped("cancelled", 1)
                continue
            if entry.deadline is not None and entry.deadline <= now:
                queue.popleft()
                self._dequeue(entry)
                entry.future.set_exception(
                    DeadlineExceeded(f"request expired after waiting in the queue of {self.name}")
                )
                expired += 1
                continue
            if key is None:
                key = entry.key
            elif entry.key != key:
                passed_over.append(queue.popleft())
                continue
            if rows + entry.rows > limit:
                break
            queue.popleft()
            self._dequeue(entry)
            taken.append(entry)
            rows += entry.rows
            if rows == limit:
                break
        if passed_over:
            queue.extendleft(reversed(passed_over))
        if expired:
            self._observer.dropped("deadline", expired)
        return taken

    def _dequeue(self, entry: _Entry) -> None:
        entry.queued = False
        self._queued_rows -= entry.rows

    def _execute_inline(self, batch: list[_Entry], now: float) -> None:
        try:
            outputs = self._run(stack([e.inputs for e in batch]))
        except Exception as exc:
            self._fail(batch, exc, now)
            return
        self._deliver(batch, outputs, now)

    def _execute_in_executor(self, batch: list[_Entry], now: float) -> None:
        loop = self._loop
        assert loop is not None
        try:
            inputs = stack([e.inputs for e in batch])
        except Exception as exc:  # never leave callers hanging on a bug
            self._fail(batch, exc, now)
            return
        self._in_flight += 1
        task = loop.run_in_executor(self._executor, self._run, inputs)  # type: ignore[arg-type]
        self._tasks.add(task)

        def done(fut: asyncio.Future[Outputs]) -> None:
            self._tasks.discard(fut)
            self._in_flight -= 1
            exc = fut.exception() if not fut.cancelled() else Unavailable("batch cancelled")
            if exc is not None:
                self._fail(batch, exc, now)
            else:
                self._deliver(batch, fut.result(), now)
            self._flush()

        task.add_done_callback(done)

    def _deliver(self, batch: list[_Entry], outputs: Outputs, started: float) -> None:
        finished = self._clock.now()
        parts = split_rows(outputs, [e.rows for e in batch])
        rows = 0
        for entry, part in zip(batch, parts, strict=True):
            rows += entry.rows
            if not entry.future.done():
                entry.future.set_result(part)
        self._observer.batch_done(
            rows, [started - e.enqueued for e in batch], finished - started, True
        )
        if self._tracer is not None:
            self._trace(batch, started, finished, rows, True)

    def _fail(self, batch: list[_Entry], exc: BaseException, started: float) -> None:
        finished = self._clock.now()
        if not isinstance(exc, ModelError | Unavailable):
            log.exception("batch for %s failed unexpectedly", self.name, exc_info=exc)
            exc = ModelError(f"model {self.name} failed: {type(exc).__name__}: {exc}")
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(exc)
        rows = sum(e.rows for e in batch)
        self._observer.batch_done(
            rows, [started - e.enqueued for e in batch], finished - started, False
        )
        if self._tracer is not None:
            self._trace(batch, started, finished, rows, False)

    def _trace(
        self, batch: list[_Entry], started: float, finished: float, rows: int, ok: bool
    ) -> None:
        traces = [e.trace for e in batch]
        if any(t is not None for t in traces):
            assert self._tracer is not None
            self._tracer.batch(traces, [e.enqueued for e in batch], started, finished, rows, ok)

    def _check_idle(self) -> None:
        if self._queued_rows == 0 and self._in_flight == 0 and self._alone == 0:
            self._idle.set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until every accepted request has been answered."""
        await self._idle.wait()

    def close(self) -> None:
        """Refuse new requests and fail those still queued (after a drain, there are none)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_watch()
        while self._queue:
            entry = self._queue.popleft()
            if entry.queued:
                self._dequeue(entry)
                if not entry.future.done():
                    entry.future.set_exception(Unavailable(f"model {self.name} was unloaded"))
        self._check_idle()
