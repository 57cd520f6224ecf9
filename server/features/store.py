"""The FeatureStore protocol, and the lookup that coalesces callers into round trips."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from server.breaker import CircuitBreaker
from server.errors import Unavailable

log = logging.getLogger(__name__)


class FeatureStoreError(Exception):
    """A store could not answer (connection, timeout, loading, auth). Adapters raise only this."""


class FeatureStore(Protocol):
    """Key -> packed vector storage. `fetch` is one round trip for any number of keys."""

    description: str

    async def fetch(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class LookupObserver(Protocol):
    def round_trip(self, keys: int, seconds: float, ok: bool) -> None: ...


class _Null:
    def round_trip(self, keys: int, seconds: float, ok: bool) -> None:
        pass


class FeatureLookup:
    """Coalesces concurrent lookups into shared round trips.

    Lookups arriving in one event-loop tick travel together; while a round trip is in flight,
    new lookups wait and go together in the next (at most `max_in_flight` at once). Like the
    batcher, it is eager when idle and patient under load: once a round trip has carried more
    than one lookup, the next goes when `min_keys` keys are waiting, when as many lookups are
    waiting as the largest of the last round trips carried (closed-loop callers come back
    together, so a handful of callers never wait out the window), or when the oldest has
    waited `max_delay_s`; never more than `max_keys` keys. A lone lookup goes at once. Each
    round trip has a timeout; a failed or timed-out one fails its callers with Unavailable
    naming the store, fast. An optional circuit breaker counts round trips (the store's
    failures, not each caller's); while it is open, lookups are refused before they queue.
    """

    def __init__(
        self,
        store: FeatureStore,
        *,
        timeout_s: float = 0.02,
        max_in_flight: int = 1,
        max_delay_s: float = 0.005,
        min_keys: int = 16,
        max_keys: int = 512,
        observer: LookupObserver | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.breaker = breaker
        self._now = clock
        self._max_delay = max_delay_s
        self._min_keys = max(1, min_keys)
        self._max_keys = max_keys
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._oldest = 0.0
        # Lookups carried by the last round trips; their maximum is the expected crowd.
        self._crowds: collections.deque[int] = collections.deque(maxlen=16)
        self._crowd = 0
        self._pending_keys = 0
        self.store = store
        self._timeout = timeout_s
        self._max_in_flight = max_in_flight
        self._observer: LookupObserver = observer or _Null()
        self._pending: list[tuple[Sequence[str], asyncio.Future[list[bytes | None]]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        if breaker is not None and breaker.rejecting(self._time(loop)):
            raise self._open_error(breaker)
        future: asyncio.Future[list[bytes | None]] = loop.create_future()
        if not self._pending:
            self._oldest = loop.time()
        self._pending.append((keys, future))
        self._pending_keys += len(keys)
        self._arm(loop)
        return await future

    def _time(self, loop: asyncio.AbstractEventLoop) -> float:
        return self._now() if self._now is not None else loop.time()

    def _open_error(self, breaker: CircuitBreaker) -> Unavailable:
        return Unavailable(
            f"circuit breaker {breaker.name} is open: feature store {self.store.description} "
            f"is failing (retry after {breaker.config.wait_duration_in_open_s:g}s)"
        )

    def _ready(self) -> bool:
        """Whether the waiting lookups should go now rather than wait for company."""
        if not self._busy or self._pending_keys >= self._min_keys:
            return True
        return self._crowd > 1 and len(self._pending) >= self._crowd

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the next flush: at the end of this tick when ready, else when the oldest
        waiting lookup has waited max_delay (a finished round trip re-arms)."""
        if self._in_flight >= self._max_in_flight or self._scheduled or not self._pending:
            return
        if self._pending_keys >= self._max_keys or self._ready():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._scheduled = True
            loop.call_soon(self._flush)
        elif self._timer is None:
            delay = max(0.0, self._oldest + self._max_delay - loop.time())
            self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._in_flight >= self._max_in_flight:
            return
        batch = [(k, f) for k, f in self._pending if not f.done()]
        self._pending = []
        self._pending_keys = 0
        if not batch:
            return
        # Concurrency is evident when a round trip finds company (see DynamicBatcher).
        self._busy = len(batch) > 1
        self._crowds.append(len(batch))
        self._crowd = max(self._crowds)
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._round_trip(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _round_trip(
        self, batch: list[tuple[Sequence[str], asyncio.Future[list[bytes | None]]]]
    ) -> None:
        keys = [key for ks, _ in batch for key in ks]
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        permit = None
        start = loop.time()
        try:
            if breaker is not None:
                permit = breaker.allow(self._time(loop))
                if permit is None:  # half-open, its probes already out
                    raise self._open_error(breaker)
            try:
                values = await asyncio.wait_for(self.store.fetch(keys), self._timeout)
            except (FeatureStoreError, TimeoutError) as exc:
                elapsed = loop.time() - start
                self._observer.round_trip(len(keys), elapsed, False)
                if breaker is not None and permit is not None:
                    breaker.record(permit, False, elapsed, self._time(loop))
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise Unavailable(
                    f"feature store {self.store.description} {reason} "
                    f"(lookup timeout {self._timeout * 1000:.0f} ms)"
                ) from None
            except BaseException:
                if breaker is not None and permit is not None:
                    breaker.release(permit, self._time(loop))
                raise
        except Unavailable as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        else:
            elapsed = loop.time() - start
            self._observer.round_trip(len(keys), elapsed, True)
            if breaker is not None and permit is not None:
                breaker.record(permit, True, elapsed, self._time(loop))
            offset = 0
            for ks, future in batch:
                part = values[offset : offset + len(ks)]
                offset += len(ks)
                if not future.done():
                    future.set_result(part)
        finally:
            self._in_flight -= 1
            for _, future in batch:  # cancelled mid-way (shutdown): nobody is left waiting
                if not future.done():
                    future.set_exception(Unavailable("feature lookup cancelled"))
            self._arm(loop)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        await self.store.close()
