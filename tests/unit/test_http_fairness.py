"""TurnBudget on a real event loop: how many REST requests start per loop turn while gRPC is
busy. Turns are counted with `asyncio.sleep(0)` (one yield each), never waited for in time."""

from __future__ import annotations

import asyncio

import pytest

from server.api.http.fairness import TurnBudget


async def _admit(budget: TurnBudget, order: list[int], index: int) -> None:
    if not budget.try_admit():
        await budget.wait()
    order.append(index)


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_without_grpc_in_flight_every_request_starts_at_once() -> None:
    budget = TurnBudget(1, contended=lambda: False)
    assert all(budget.try_admit() for _ in range(100))
    assert budget.waited == 0


async def test_while_grpc_is_busy_two_per_turn_start_and_the_rest_follow_in_order() -> None:
    budget = TurnBudget(2, contended=lambda: True)
    order: list[int] = []
    tasks = [asyncio.create_task(_admit(budget, order, i)) for i in range(7)]
    await asyncio.sleep(0)  # every task has run its first step: in the same turn
    assert order == [0, 1]
    assert budget.waited == 5
    await asyncio.gather(*tasks)
    assert order == list(range(7))  # first come, first served


async def test_each_later_turn_admits_at_most_the_budget() -> None:
    budget = TurnBudget(2, contended=lambda: True)
    order: list[int] = []
    tasks = [asyncio.create_task(_admit(budget, order, i)) for i in range(6)]
    seen = []
    for _ in range(8):
        await asyncio.sleep(0)
        seen.append(len(order))
    await asyncio.gather(*tasks)
    steps = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    assert max(steps) <= 2
    assert seen[-1] == 6


async def test_a_new_request_queues_behind_waiters_even_with_budget_left() -> None:
    busy = [True]
    budget = TurnBudget(1, contended=lambda: busy[0])
    order: list[int] = []
    first = [asyncio.create_task(_admit(budget, order, i)) for i in range(3)]
    await asyncio.sleep(0)
    busy[0] = False  # gRPC went quiet, but requests 1 and 2 still wait their turn
    assert not budget.try_admit()
    await asyncio.gather(*first)
    assert order == [0, 1, 2]
    assert budget.try_admit()


async def test_once_grpc_is_quiet_every_waiter_is_released_in_one_turn() -> None:
    busy = [True]
    budget = TurnBudget(1, contended=lambda: busy[0])
    order: list[int] = []
    tasks = [asyncio.create_task(_admit(budget, order, i)) for i in range(5)]
    await asyncio.sleep(0)
    assert order == [0]
    busy[0] = False
    await _turns(3)
    assert order == [0, 1, 2, 3, 4]
    await asyncio.gather(*tasks)


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    budget = TurnBudget(1, contended=lambda: True)
    order: list[int] = []
    tasks = [asyncio.create_task(_admit(budget, order, i)) for i in range(3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    await asyncio.gather(tasks[0], tasks[2])
    assert order == [0, 2]
    assert tasks[1].cancelled()


async def test_the_turn_callback_stops_when_nothing_is_left() -> None:
    budget = TurnBudget(1, contended=lambda: True)
    assert budget.try_admit()
    await _turns(3)
    assert budget._tick is None  # no callback keeps the loop spinning while idle
    assert budget.try_admit()


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="per_turn"):
        TurnBudget(0, contended=lambda: True)
