"""FeatureLookup's coalescing policy and its circuit breaker, against a store the test drives.

The store holds each round trip until the test releases it, and the coalescing window is set far
beyond the test's life, so every flush here happens because of the policy, never a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from server.breaker import BreakerConfig, BreakerState, CircuitBreaker
from server.clock import FakeClock
from server.errors import Unavailable
from server.features.store import FeatureLookup, FeatureStoreError

FOREVER_S = 3600.0


class GatedStore:
    """Answers each key with its own bytes once the test opens the gate; records round trips."""

    description = "gated://test"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.failing = False

    async def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls.append(list(keys))
        self.started.set()
        await self.gate.wait()
        if self.failing:
            raise FeatureStoreError("ConnectionError: refused")
        return [k.encode() for k in keys]

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def settle() -> None:
    """Let every ready callback run (flushes are scheduled for the end of a loop tick)."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def store() -> GatedStore:
    return GatedStore()


async def test_lone_lookup_goes_at_once_and_lookups_of_one_tick_share_a_round_trip(
    store: GatedStore,
) -> None:
    lookup = FeatureLookup(store, max_delay_s=FOREVER_S, timeout_s=FOREVER_S)
    assert await lookup.get(["a"]) == [b"a"]
    b, c = await asyncio.gather(lookup.get(["b"]), lookup.get(["c1", "c2"]))
    assert (b, c) == ([b"b"], [b"c1", b"c2"])
    assert store.calls == [["a"], ["b", "c1", "c2"]]


async def test_under_load_a_round_trip_waits_for_the_usual_crowd(store: GatedStore) -> None:
    lookup = FeatureLookup(store, max_delay_s=FOREVER_S, timeout_s=FOREVER_S, min_keys=100)
    # Three callers in one tick: concurrency is evident, and three is the crowd.
    await asyncio.gather(*(lookup.get([k]) for k in ("a", "b", "c")))
    first = asyncio.create_task(lookup.get(["d"]))
    second = asyncio.create_task(lookup.get(["e"]))
    await settle()
    assert store.calls == [["a", "b", "c"]], "two of a crowd of three must wait"
    third = asyncio.create_task(lookup.get(["f"]))
    assert await asyncio.gather(first, second, third) == [[b"d"], [b"e"], [b"f"]]
    assert store.calls[1] == ["d", "e", "f"]


async def test_under_load_min_keys_waiting_send_the_round_trip(store: GatedStore) -> None:
    lookup = FeatureLookup(store, max_delay_s=FOREVER_S, timeout_s=FOREVER_S, min_keys=4)
    await asyncio.gather(*(lookup.get([k]) for k in ("a", "b", "c", "d", "e", "f")))
    small = asyncio.create_task(lookup.get(["g"]))
    await settle()
    assert len(store.calls) == 1
    big = asyncio.create_task(lookup.get(["h1", "h2", "h3"]))  # 4 keys now wait
    await asyncio.gather(small, big)
    assert store.calls[1] == ["g", "h1", "h2", "h3"]


async def test_a_lone_lookup_under_load_is_bounded_by_the_window(store: GatedStore) -> None:
    lookup = FeatureLookup(store, max_delay_s=0.0, timeout_s=FOREVER_S, min_keys=100)
    await asyncio.gather(*(lookup.get([k]) for k in ("a", "b", "c")))
    # Busy, crowd of three, but the window is zero: the lone lookup is not held.
    assert await lookup.get(["d"]) == [b"d"]
    assert store.calls[1] == ["d"]


async def test_lookups_arriving_during_a_round_trip_share_the_next(store: GatedStore) -> None:
    lookup = FeatureLookup(store, max_delay_s=FOREVER_S, timeout_s=FOREVER_S)
    store.gate.clear()
    first = asyncio.create_task(lookup.get(["a"]))
    await store.started.wait()
    waiting = [asyncio.create_task(lookup.get([k])) for k in ("b", "c")]
    await settle()
    assert store.calls == [["a"]], "one round trip in flight at a time"
    store.gate.set()
    await asyncio.gather(first, *waiting)
    assert store.calls == [["a"], ["b", "c"]]


def _breaker() -> CircuitBreaker:
    config = BreakerConfig(
        minimum_number_of_calls=2,
        sliding_window_size=2,
        failure_rate_threshold=50,
        wait_duration_in_open_s=30,
        permitted_calls_in_half_open=1,
    )
    return CircuitBreaker("feature_store", config)


async def test_the_breaker_counts_round_trips_and_refuses_lookups_before_they_queue(
    store: GatedStore,
) -> None:
    clock = FakeClock()
    breaker = _breaker()
    lookup = FeatureLookup(store, timeout_s=FOREVER_S, min_keys=1, breaker=breaker, clock=clock.now)
    store.failing = True
    # Two round trips fail (the second carries two callers: still one call for the breaker).
    with pytest.raises(Unavailable, match="gated://test ConnectionError"):
        await lookup.get(["a"])
    results = await asyncio.gather(lookup.get(["b"]), lookup.get(["c"]), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert breaker.state is BreakerState.OPEN
    calls = len(store.calls)
    with pytest.raises(Unavailable, match="circuit breaker feature_store is open"):
        await lookup.get(["d"])
    assert len(store.calls) == calls, "an open breaker sends nothing to the store"
    # After the wait, one probe round trip; the store is back, so the breaker closes.
    store.failing = False
    clock.advance(31)
    assert await lookup.get(["e"]) == [b"e"]
    assert breaker.state is BreakerState.CLOSED
