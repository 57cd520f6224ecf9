"""`ShadowMirror` runs mirrored work for one served model: a bounded queue that sheds instead of
waiting, drained by one background task at lower priority than the request path. Which
requests are mirrored where is routing's business (`server.routing.mirror_targets`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)


T = TypeVar("T")
MirrorJob = Callable[[], Awaitable[T]]


@dataclass(slots=True)
class MirrorCounters:
    """What happened to offered jobs. `offered` counts every offer, shed or not; a job offered
    while the mirror is stopped counts as offered only."""

    offered: int = 0
    shed_full: int = 0
    shed_load: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def shed(self) -> int:
        return self.shed_full + self.shed_load

    def as_dict(self) -> dict[str, int]:
        return {
            "offered": self.offered,
            "shed_full": self.shed_full,
            "shed_load": self.shed_load,
            "completed": self.completed,
            "failed": self.failed,
        }


class ShadowMirror(Generic[T]):
    """Fire-and-forget mirrored work for one served model.

    Guarantees: `offer` is synchronous and O(1), never blocks and never raises; a job is shed
    (counted, never run) when the queue holds `capacity` jobs or when `load_signal()` says the
    primary path is under pressure, both when it is offered and again when it would start; at
    most `concurrency` jobs run at once; the worker yields to the event loop before starting each
    job, so request-path callbacks that are ready run first; a job's exception is counted (and
    passed to `on_error`), never propagated; a job's result goes to `on_result`.

    A job is a zero-argument callable returning an awaitable, so a job that is shed or dropped
    at `stop()` never creates a coroutine that would go un-awaited.
    """

    def __init__(
        self,
        name: str,
        *,
        capacity: int,
        concurrency: int = 1,
        load_signal: Callable[[], bool] | None = None,
        on_result: Callable[[T], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected an integer >= 1, got {capacity!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency: expected an integer >= 1, got {concurrency!r}")
        self.name = name
        self.capacity = capacity
        self.concurrency = concurrency
        self.counters = MirrorCounters()
        self._load_signal = load_signal
        self._on_result = on_result
        self._on_error = on_error
        self._queue: asyncio.Queue[MirrorJob[T]] = asyncio.Queue(maxsize=capacity)
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._stopped = False
        # Accepted jobs not yet finished: queued, taken by the worker, or running.
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    def offer(self, job: MirrorJob[T]) -> bool:
        """Queue `job` to run later; False (and counted) when it is shed instead."""
        self.counters.offered += 1
        if self._stopped:
            return False
        if self._under_load():
            self.counters.shed_load += 1
            return False
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counters.shed_full += 1
            return False
        self._outstanding += 1
        self._idle.clear()
        return True

    def _under_load(self) -> bool:
        if self._load_signal is None:
            return False
        try:
            return bool(self._load_signal())
        except Exception:
            # A broken signal must not break the request path; shed to be safe.
            log.exception("load signal of shadow mirror %s failed", self.name)
            return True

    async def start(self) -> None:
        if self._worker is None and not self._stopped:
            self._worker = asyncio.create_task(self._work(), name=f"shadow-mirror-{self.name}")

    async def stop(self) -> None:
        """Stop taking jobs, cancel the running ones and drop the queued ones."""
        self._stopped = True
        tasks: list[asyncio.Task[None]] = list(self._running)
        if self._worker is not None:
            tasks.append(self._worker)
            self._worker = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._outstanding = 0
        self._idle.set()

    async def join(self) -> None:
        """Wait until nothing is queued or running (tests, and a graceful drain if wanted)."""
        await self._idle.wait()

    async def _work(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                job = await self._queue.get()
                # Lower priority: let everything already ready on the loop (request-path
                # callbacks included) run before this job starts.
                await asyncio.sleep(0)
            except BaseException:
                self._slots.release()
                raise
            if self._under_load():
                self.counters.shed_load += 1
                self._slots.release()
                self._finished()
                continue
            task = asyncio.create_task(self._run(job))
            self._running.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()
        self._finished()

    def _finished(self) -> None:
        self._outstanding = max(0, self._outstanding - 1)
        if self._outstanding == 0:
            self._idle.set()

    async def _run(self, job: MirrorJob[T]) -> None:
        try:
            result = await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters.failed += 1
            self._report_error(exc)
            return
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception as exc:
                self.counters.failed += 1
                log.exception("on_result of shadow mirror %s failed", self.name)
                self._report_error(exc)
                return
        self.counters.completed += 1

    def _report_error(self, exc: BaseException) -> None:
        if self._on_error is None:
            log.debug("shadow job of %s failed: %r", self.name, exc)
            return
        try:
            self._on_error(exc)
        except Exception:
            log.exception("on_error of shadow mirror %s failed", self.name)
