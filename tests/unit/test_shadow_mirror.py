"""The ShadowMirror queue: bounded, shedding, never blocking the caller (real event loop)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.shadow.mirror import ShadowMirror


class _Blocked:
    """Jobs that announce they started, then wait for the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started: list[int] = []
        self.running = 0
        self.max_running = 0
        self.some_started = asyncio.Event()
        self.wanted = 1

    def job(self, n: int) -> Any:
        async def run() -> int:
            self.started.append(n)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            if len(self.started) >= self.wanted:
                self.some_started.set()
            try:
                await self.gate.wait()
            finally:
                self.running -= 1
            return n

        return run


async def test_offer_never_blocks_while_the_worker_is_stuck() -> None:
    blocked = _Blocked()
    mirror: ShadowMirror[int] = ShadowMirror("churn", capacity=4, concurrency=1)
    await mirror.start()
    assert mirror.offer(blocked.job(0))
    await blocked.some_started.wait()
    # Synchronous calls: if offer() could block, this loop would never finish.
    results = [mirror.offer(blocked.job(i)) for i in range(1, 101)]
    assert results[:4] == [True] * 4
    assert not any(results[4:])
    assert mirror.counters.shed_full == 96
    assert mirror.counters.offered == 101
    assert mirror.queued == 4
    await mirror.stop()


async def test_full_queue_sheds_and_counts_then_recovers() -> None:
    blocked = _Blocked()
    results: list[int] = []
    mirror: ShadowMirror[int] = ShadowMirror(
        "churn", capacity=2, concurrency=1, on_result=results.append
    )
    await mirror.start()
    mirror.offer(blocked.job(0))
    await blocked.some_started.wait()
    assert [mirror.offer(blocked.job(i)) for i in (1, 2, 3)] == [True, True, False]
    assert mirror.counters.shed_full == 1
    assert mirror.counters.shed == 1
    blocked.gate.set()
    await mirror.join()
    assert sorted(results) == [0, 1, 2]
    assert mirror.counters.completed == 3
    assert mirror.offer(blocked.job(4))
    await mirror.join()
    assert sorted(results) == [0, 1, 2, 4]
    await mirror.stop()


async def test_load_signal_sheds_without_queueing() -> None:
    pressure = [True]
    ran: list[int] = []

    async def job() -> int:
        ran.append(1)
        return 1

    mirror: ShadowMirror[int] = ShadowMirror("churn", capacity=10, load_signal=lambda: pressure[0])
    await mirror.start()
    assert not mirror.offer(job)
    assert mirror.counters.shed_load == 1
    assert mirror.queued == 0
    pressure[0] = False
    assert mirror.offer(job)
    await mirror.join()
    assert ran == [1]
    assert mirror.counters.as_dict() == {
        "offered": 2,
        "shed_full": 0,
        "shed_load": 1,
        "completed": 1,
        "failed": 0,
    }
    await mirror.stop()


async def test_jobs_queued_before_pressure_are_shed_when_they_would_start() -> None:
    pressure = [False]
    blocked = _Blocked()
    mirror: ShadowMirror[int] = ShadowMirror(
        "churn", capacity=10, concurrency=1, load_signal=lambda: pressure[0]
    )
    await mirror.start()
    mirror.offer(blocked.job(0))
    await blocked.some_started.wait()
    assert mirror.offer(blocked.job(1))
    pressure[0] = True
    blocked.gate.set()
    await mirror.join()
    assert blocked.started == [0]
    assert mirror.counters.shed_load == 1
    assert mirror.counters.completed == 1
    await mirror.stop()


async def test_load_signal_that_raises_sheds_instead_of_raising() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    async def job() -> int:
        return 1

    mirror: ShadowMirror[int] = ShadowMirror("churn", capacity=1, load_signal=broken)
    assert not mirror.offer(job)
    assert mirror.counters.shed_load == 1


async def test_concurrency_cap_is_respected() -> None:
    blocked = _Blocked()
    blocked.wanted = 3
    mirror: ShadowMirror[int] = ShadowMirror("churn", capacity=20, concurrency=3)
    await mirror.start()
    for i in range(10):
        assert mirror.offer(blocked.job(i))
    await blocked.some_started.wait()
    assert mirror.running == 3
    assert mirror.queued == 7
    blocked.gate.set()
    await mirror.join()
    assert blocked.max_running == 3
    assert sorted(blocked.started) == list(range(10))
    assert mirror.counters.completed == 10
    await mirror.stop()


async def test_failing_job_is_counted_not_propagated() -> None:
    errors: list[BaseException] = []

    async def bad() -> int:
        raise ValueError("shadow model broke")

    async def good() -> int:
        return 7

    results: list[int] = []
    mirror: ShadowMirror[int] = ShadowMirror(
        "churn", capacity=4, on_result=results.append, on_error=errors.append
    )
    await mirror.start()
    mirror.offer(bad)
    mirror.offer(good)
    await mirror.join()
    assert mirror.counters.failed == 1
    assert mirror.counters.completed == 1
    assert results == [7]
    assert [type(e) for e in errors] == [ValueError]
    await mirror.stop()


async def test_on_result_that_raises_counts_as_failed() -> None:
    def explode(_: int) -> None:
        raise RuntimeError("sink broke")

    async def job() -> int:
        return 1

    mirror: ShadowMirror[int] = ShadowMirror("churn", capacity=2, on_result=explode)
    await mirror.start()
    mirror.offer(job)
    await mirror.join()
    assert mirror.counters.failed == 1
    assert mirror.counters.completed == 0
    await mirror.stop()


async def test_stop_cancels_running_and_drops_queued_jobs() -> None:
    blocked = _Blocked()
    cancelled = asyncio.Event()

    async def stuck() -> int:
        try:
            await blocked.job(0)()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    mirror: ShadowMirror[int] = ShadowMirror("churn", capacity=4)
    await mirror.start()
    mirror.offer(stuck)
    mirror.offer(blocked.job(1))
    await blocked.some_started.wait()
    await mirror.stop()
    assert cancelled.is_set()
    assert mirror.running == 0
    assert mirror.queued == 0
    assert blocked.started == [0]
    assert mirror.counters.failed == 0
    assert not mirror.offer(blocked.job(2))
    await mirror.join()


async def test_job_is_not_called_until_it_runs() -> None:
    """A shed job never creates a coroutine (which would warn as never awaited)."""
    calls: list[int] = []

    def job() -> Any:
        calls.append(1)

        async def run() -> int:
            return 1

        return run()

    mirror: ShadowMirror[int] = ShadowMirror("churn", capacity=1, load_signal=lambda: True)
    mirror.offer(job)
    assert calls == []


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": 1, "concurrency": 0}])
def test_mirror_refuses_bad_bounds(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"capacity|concurrency"):
        ShadowMirror("churn", **kwargs)
