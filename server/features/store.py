"""The FeatureStore protocol, and the lookup that coalesces callers into round trips."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

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
    than one lookup, the next waits up to `max_delay_s` (or until `max_keys`) to fill, so under
    load round trips per request fall well below one; a lone lookup goes at once. Each round
    trip has a timeout; a failed or timed-out one fails its callers with Unavailable naming the
    store, fast.
    """

    def __init__(
        self,
        store: FeatureStore,
        *,
        timeout_s: float = 0.02,
        max_in_flight: int = 1,
        max_delay_s: float = 0.002,
        max_keys: int = 512,
        observer: LookupObserver | None = None,
    ) -> None:
        self._max_delay = max_delay_s
        self._max_keys = max_keys
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
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
        future: asyncio.Future[list[bytes | None]] = loop.create_future()
        self._pending.append((keys, future))
        self._pending_keys += len(keys)
        if self._in_flight < self._max_in_flight:
            if self._pending_keys >= self._max_keys:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._flush()
            elif not self._scheduled:
                self._scheduled = True
                if self._busy:
                    self._timer = loop.call_later(self._max_delay, self._flush)
                else:
                    loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
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
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._round_trip(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _round_trip(
        self, batch: list[tuple[Sequence[str], asyncio.Future[list[bytes | None]]]]
    ) -> None:
        keys = [key for ks, _ in batch for key in ks]
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            values = await asyncio.wait_for(self.store.fetch(keys), self._timeout)
        except (FeatureStoreError, TimeoutError) as exc:
            self._observer.round_trip(len(keys), loop.time() - start, False)
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            error = Unavailable(
                f"feature store {self.store.description} {reason} "
                f"(lookup timeout {self._timeout * 1000:.0f} ms)"
            )
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        else:
            self._observer.round_trip(len(keys), loop.time() - start, True)
            offset = 0
            for ks, future in batch:
                part = values[offset : offset + len(ks)]
                offset += len(ks)
                if not future.done():
                    future.set_result(part)
        finally:
            self._in_flight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                if self._busy:
                    self._timer = loop.call_later(self._max_delay, self._flush)
                else:
                    loop.call_soon(self._flush)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.store.close()
