"""DynamicBatcher on a real event loop, with a plain Python model (no onnxruntime).

Loop iterations are counted with `asyncio.sleep(0)` (one yield each), never waited for in time:
a request "runs at once" when it is answered within a few iterations while the queue delay is
10 s. Executor-mode tests hold the model in its thread with a threading.Event (the gate).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.batching import QUIET_TURNS, Arrays, BatchPolicy, DynamicBatcher, Outputs
from server.clock import Clock, FakeClock, MonotonicClock
from server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelError,
    ResourceExhausted,
    Unavailable,
)

LONG = 10.0  # a queue delay no test may wait for


class Model:
    """Doubles `x` and sums its rows; records each batch; fails on a negative value."""

    def __init__(
        self, gate: threading.Event | None = None, clock: FakeClock | None = None, cost: float = 0.0
    ) -> None:
        self.batches: list[np.ndarray] = []
        self._gate = gate
        self._clock = clock
        self._cost = cost

    def __call__(self, inputs: Arrays) -> Outputs:
        x = inputs["x"]
        self.batches.append(np.array(x, copy=True))
        if self._gate is not None and not self._gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        if self._clock is not None:
            self._clock.advance(self._cost)
        if (x < 0).any():
            raise RuntimeError("negative input")
        return [x * 2, x.sum(axis=1)]

    @property
    def batch_rows(self) -> list[int]:
        return [len(b) for b in self.batches]


class Observer:
    def __init__(self) -> None:
        self.batches: list[tuple[int, list[float], float, bool]] = []
        self.drops: list[tuple[str, int]] = []

    def batch_done(
        self, rows: int, queue_waits: Sequence[float], compute_s: float, ok: bool
    ) -> None:
        self.batches.append((rows, list(queue_waits), compute_s, ok))

    def dropped(self, reason: str, count: int) -> None:
        self.drops.append((reason, count))


def req(value: float, rows: int = 1, width: int = 3) -> Arrays:
    return {"x": np.full((rows, width), value, dtype=np.float32)}


def assert_answer(outputs: Outputs, inputs: Arrays) -> None:
    doubled, sums = outputs
    np.testing.assert_array_equal(doubled, inputs["x"] * 2)
    np.testing.assert_array_equal(sums, inputs["x"].sum(axis=1))


async def ticks(n: int = 5) -> None:
    """Let the loop run n iterations (a yield, not a wait for time)."""
    for _ in range(n):
        await asyncio.sleep(0)


def make(
    model: Model,
    clock: Clock | None = None,
    *,
    executor: ThreadPoolExecutor | None = None,
    observer: Observer | None = None,
    **policy: object,
) -> DynamicBatcher:
    settings: dict[str, object] = {"max_batch_size": 8, "max_queue_delay_s": LONG, **policy}
    return DynamicBatcher(
        "m",
        model,
        BatchPolicy(**settings),  # type: ignore[arg-type]
        clock or MonotonicClock(),
        executor=executor,
        observer=observer,
    )


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def executor(gate: threading.Event) -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4)
    yield pool
    gate.set()  # never leave a model thread blocked
    pool.shutdown(wait=True)


# ---- batching -------------------------------------------------------------------------------


async def test_lone_request_runs_at_once_without_waiting_for_the_delay() -> None:
    model = Model()
    batcher = make(model)
    inputs = req(1.0)
    task = asyncio.create_task(batcher.submit(inputs, 1))
    await ticks()
    assert task.done()
    assert_answer(task.result(), inputs)
    assert model.batch_rows == [1]


async def test_requests_submitted_in_one_tick_form_one_batch() -> None:
    model = Model()
    batcher = make(model, max_batch_size=16)
    requests = [req(float(i), rows) for i, rows in enumerate([1, 2, 1, 3, 1])]
    results = await asyncio.gather(*(batcher.submit(r, len(r["x"])) for r in requests))
    assert model.batch_rows == [8]
    np.testing.assert_array_equal(model.batches[0], np.concatenate([r["x"] for r in requests]))
    for outputs, inputs in zip(results, requests, strict=True):
        assert_answer(outputs, inputs)


async def test_batch_never_exceeds_max_batch_size_rows() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_queue_delay_s=0.0)
    requests = [req(float(i), rows) for i, rows in enumerate([3, 2, 1, 4, 2, 3, 1, 1, 1, 1, 1])]
    results = await asyncio.gather(*(batcher.submit(r, len(r["x"])) for r in requests))
    assert len(model.batches) > 1
    assert all(rows <= 4 for rows in model.batch_rows)
    # Same shape everywhere: batches are cut in arrival order.
    np.testing.assert_array_equal(
        np.concatenate(model.batches), np.concatenate([r["x"] for r in requests])
    )
    for outputs, inputs in zip(results, requests, strict=True):
        assert_answer(outputs, inputs)


async def test_request_with_more_rows_than_max_batch_size_is_invalid_argument() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4)
    with pytest.raises(InvalidArgument, match="max_batch_size"):
        await batcher.submit(req(1.0, rows=5), 5)
    assert model.batches == []
    assert batcher.queued_rows == 0


async def test_requests_of_different_shapes_are_never_stacked_together() -> None:
    model = Model()
    batcher = make(model, max_batch_size=16, max_queue_delay_s=0.0)
    widths = [3, 5, 3, 5, 3]
    requests = [req(float(i), width=w) for i, w in enumerate(widths)]
    results = await asyncio.gather(*(batcher.submit(r, 1) for r in requests))
    assert len(model.batches) == 2
    narrow, wide = model.batches
    # Each batch holds one shape group, in arrival order within the group.
    np.testing.assert_array_equal(narrow[:, 0], [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(wide[:, 0], [1.0, 3.0])
    for outputs, inputs in zip(results, requests, strict=True):
        assert_answer(outputs, inputs)


async def test_model_failure_fails_only_that_batch_with_model_error() -> None:
    model = Model()
    observer = Observer()
    batcher = make(model, observer=observer, max_queue_delay_s=0.0)
    bad, mate, other_shape = req(-1.0), req(1.0), req(2.0, width=5)
    results = await asyncio.gather(
        batcher.submit(bad, 1),
        batcher.submit(mate, 1),
        batcher.submit(other_shape, 1),
        return_exceptions=True,
    )
    assert isinstance(results[0], ModelError)
    assert isinstance(results[1], ModelError)
    assert "negative input" in results[0].message
    assert_answer(results[2], other_shape)  # type: ignore[arg-type]
    later = req(3.0)
    assert_answer(await batcher.submit(later, 1), later)
    assert [(rows, ok) for rows, _, _, ok in observer.batches] == [
        (2, False),
        (1, True),
        (1, True),
    ]


# ---- the queue: bound, cancellation, deadlines ---------------------------------------------


async def test_full_queue_raises_resource_exhausted_without_suspending(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    model = Model(gate)
    observer = Observer()
    batcher = make(model, executor=executor, observer=observer, max_queue_size=3)
    running = asyncio.create_task(batcher.submit(req(1.0), 1))
    await ticks()
    assert batcher.in_flight == 1
    waiting = asyncio.create_task(batcher.submit(req(2.0, rows=3), 3))
    await ticks()
    assert batcher.queued_rows == 3

    rejected = batcher.submit(req(3.0), 1)
    with pytest.raises(ResourceExhausted, match="full"):
        rejected.send(None)  # raises on its first step: the caller never waits
    assert observer.drops == [("queue_full", 1)]
    assert batcher.queued_rows == 3

    gate.set()
    await asyncio.gather(running, waiting)
    assert model.batch_rows == [1, 3]


async def test_a_request_larger_than_the_whole_queue_says_so(executor: ThreadPoolExecutor) -> None:
    """Not "full" with the queue empty: the request can never fit, and the message names the
    bound that refuses it."""
    batcher = make(Model(threading.Event()), executor=executor, max_queue_size=3)
    with pytest.raises(
        ResourceExhausted, match=r"request has 5 rows; .* at most 3 \(max_queue_size\)"
    ):
        await batcher.submit(req(1.0, rows=5), 5)
    assert batcher.queued_rows == 0


async def test_cancelled_caller_never_reaches_the_model_and_mates_still_resolve(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    model = Model(gate)
    observer = Observer()
    batcher = make(model, executor=executor, observer=observer)
    running = asyncio.create_task(batcher.submit(req(1.0), 1))
    await ticks()
    before, doomed, after = req(2.0), req(3.0, rows=2), req(4.0)
    tasks = [asyncio.create_task(batcher.submit(r, len(r["x"]))) for r in (before, doomed, after)]
    await ticks()
    assert batcher.queued_rows == 4

    tasks[1].cancel()
    await ticks()
    assert batcher.queued_rows == 2
    assert observer.drops == [("cancelled", 1)]

    gate.set()
    assert_answer(await running, req(1.0))
    assert_answer(await tasks[0], before)
    assert_answer(await tasks[2], after)
    assert tasks[1].cancelled()
    assert model.batch_rows == [1, 2]
    assert 3.0 not in model.batches[1]
    assert batcher.queued_rows == 0


async def test_caller_cancelled_before_the_cut_is_dropped_and_reported() -> None:
    """Cancelled in the tick it queued, so the flush sees its cancelled future first."""
    model = Model()
    observer = Observer()
    batcher = make(model, observer=observer)
    kept = req(1.0)
    task_kept = asyncio.create_task(batcher.submit(kept, 1))
    task_doomed = asyncio.create_task(batcher.submit(req(2.0), 1))
    await asyncio.sleep(0)  # both queued, the flush not yet run
    assert batcher.queued_rows == 2
    task_doomed.cancel()
    assert_answer(await task_kept, kept)
    with pytest.raises(asyncio.CancelledError):
        await task_doomed
    assert model.batch_rows == [1]
    assert batcher.queued_rows == 0
    assert observer.drops == [("cancelled", 1)]


async def test_expired_request_raises_deadline_exceeded_and_never_reaches_the_model(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    clock = FakeClock()
    model = Model(gate)
    observer = Observer()
    batcher = make(model, clock, executor=executor, observer=observer)
    running = asyncio.create_task(batcher.submit(req(1.0), 1))
    await ticks()
    expiring = asyncio.create_task(batcher.submit(req(2.0), 1, deadline=clock.now() + 1.0))
    patient = req(3.0)
    in_time = asyncio.create_task(batcher.submit(patient, 1, deadline=clock.now() + 5.0))
    await ticks()
    clock.advance(2.0)

    gate.set()
    await running
    with pytest.raises(DeadlineExceeded):
        await expiring
    assert_answer(await in_time, patient)
    assert model.batch_rows == [1, 1]
    assert model.batches[1][0, 0] == 3.0
    assert observer.drops == [("deadline", 1)]
    assert batcher.queued_rows == 0


# ---- executor mode and the busy signal ------------------------------------------------------


async def test_submits_while_the_only_instance_runs_accumulate_into_the_next_batch(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    model = Model(gate)
    batcher = make(model, executor=executor, instances=1)
    first = req(1.0)
    running = asyncio.create_task(batcher.submit(first, 1))
    await ticks()
    later = [req(float(i)) for i in (2, 3, 4)]
    waiting = []
    for r in later:  # one per tick: no two arrive together
        waiting.append(asyncio.create_task(batcher.submit(r, 1)))
        await ticks(1)
    await ticks()
    assert model.batch_rows == [1]
    assert batcher.queued_rows == 3

    gate.set()
    assert_answer(await running, first)
    for task, r in zip(waiting, later, strict=True):
        assert_answer(await task, r)
    assert model.batch_rows == [1, 3]


async def test_no_more_batches_run_at_once_than_instances(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    model = Model(gate)
    batcher = make(model, executor=executor, instances=2, max_batch_size=1)
    requests = [req(float(i)) for i in range(3)]
    tasks = [asyncio.create_task(batcher.submit(r, 1)) for r in requests]
    await ticks()
    assert batcher.in_flight == 2
    assert batcher.queued_rows == 1
    gate.set()
    for task, r in zip(tasks, requests, strict=True):
        assert_answer(await task, r)
    assert model.batch_rows == [1, 1, 1]


async def test_after_a_cut_that_found_company_a_request_waits_while_more_keep_arriving() -> None:
    model = Model()
    batcher = make(model)
    # a crowd of 6: the next batch is not cut early for having as many (see decide)
    await asyncio.gather(*(batcher.submit(req(float(i)), 1) for i in range(6)))
    assert model.batch_rows == [6]

    later = [req(float(i)) for i in range(3, 8)]
    tasks = []
    for r in later:  # one per loop turn: company keeps coming, so the batch stays open
        tasks.append(asyncio.create_task(batcher.submit(r, 1)))
        await ticks(1)
    assert model.batch_rows == [6]
    await ticks(QUIET_TURNS + 3)  # then the loop is quiet: cut, without waiting out LONG
    assert model.batch_rows == [6, 5]
    for task, r in zip(tasks, later, strict=True):
        assert_answer(task.result(), r)


async def test_a_request_whose_bytes_were_read_in_a_held_turn_joins_the_batch() -> None:
    """A socket read runs as a callback that starts the handler's task; the task submits a
    turn later. Reads one turn apart are company still coming, not a quiet loop."""
    model = Model()
    batcher = make(model)
    await asyncio.gather(*(batcher.submit(req(float(i)), 1) for i in range(6)))
    loop = asyncio.get_running_loop()
    later = [req(float(i)) for i in range(4)]
    tasks: list[asyncio.Task[Outputs]] = []

    def read(r: Arrays) -> None:  # what a protocol's data_received does
        tasks.append(asyncio.create_task(batcher.submit(r, 1)))

    for r in later:
        loop.call_soon(read, r)
        await ticks(2)
    assert model.batch_rows == [6]
    await ticks(QUIET_TURNS + 3)
    assert model.batch_rows == [6, 4]
    for task, r in zip(tasks, later, strict=True):
        assert_answer(task.result(), r)
    assert batcher._watch is None  # the watch ended with the cut


async def test_the_quiet_watch_ends_when_its_callers_are_cancelled_or_the_batcher_closes() -> None:
    model = Model()
    batcher = make(model)
    await asyncio.gather(*(batcher.submit(req(1.0), 1) for _ in range(4)))
    held = asyncio.create_task(batcher.submit(req(2.0), 1))
    await ticks(2)
    assert batcher._watch is not None
    held.cancel()
    await ticks(QUIET_TURNS + 3)
    assert batcher._watch is None
    assert model.batch_rows == [4]  # the cancelled caller never reached the model

    await asyncio.gather(*(batcher.submit(req(1.0), 1) for _ in range(4)))
    closing = asyncio.create_task(batcher.submit(req(3.0), 1))
    await ticks(2)
    assert batcher._watch is not None
    batcher.close()
    assert batcher._watch is None
    with pytest.raises(Unavailable):
        await closing


async def test_preferred_sizes_wait_for_a_size_even_on_a_quiet_loop() -> None:
    model = Model()
    batcher = make(model, preferred_batch_sizes=(4,))
    first = [asyncio.create_task(batcher.submit(req(float(i)), 1)) for i in range(2)]
    await ticks(QUIET_TURNS + 5)
    assert model.batch_rows == []  # two rows, no size reached, LONG delay: held
    assert batcher._watch is None  # and no watch turning the loop meanwhile
    rest = [asyncio.create_task(batcher.submit(req(float(i)), 1)) for i in range(2)]
    await asyncio.gather(*first, *rest)
    assert model.batch_rows == [4]


async def test_a_lone_request_held_for_company_is_cut_once_the_loop_is_quiet() -> None:
    model = Model()
    observer = Observer()
    batcher = make(model, observer=observer)
    await asyncio.gather(batcher.submit(req(1.0), 1), batcher.submit(req(2.0), 1))

    held = asyncio.create_task(batcher.submit(req(3.0), 1))
    await ticks(3)
    assert not held.done()  # busy: held for company at first
    await ticks(QUIET_TURNS + 3)
    assert held.done()  # no company came: cut on the quiet loop, long before the delay
    _, waits, _, _ = observer.batches[1]
    assert waits[0] < LONG / 10

    lone = req(4.0)  # that cut found no company: the next lone request is not held
    task = asyncio.create_task(batcher.submit(lone, 1))
    await ticks(3)
    assert task.done()
    assert_answer(task.result(), lone)
    assert model.batch_rows == [2, 1, 1]


async def test_requests_arriving_every_turn_are_cut_once_the_delay_has_passed() -> None:
    """The delay still bounds the wait when the loop is never quiet."""
    clock = FakeClock()
    model = Model()
    observer = Observer()
    batcher = make(model, clock, observer=observer, max_batch_size=64, max_queue_delay_s=0.002)
    await asyncio.gather(*(batcher.submit(req(1.0), 1) for _ in range(16)))  # a crowd of 16

    tasks = []
    for i in range(10):  # one per turn, 0.5 ms apart on the clock
        tasks.append(asyncio.create_task(batcher.submit(req(float(i)), 1)))
        await ticks(1)
        clock.advance(0.0005)
    assert len(model.batch_rows) >= 2  # cut while requests were still coming
    _, waits, _, _ = observer.batches[1]
    assert 0.002 - 1e-9 <= waits[0] <= 0.0025  # the oldest waited out the delay, hardly more
    await asyncio.gather(*tasks)
    assert sum(model.batch_rows[1:]) == 10


# ---- lifecycle ------------------------------------------------------------------------------


async def test_drain_waits_for_queued_and_in_flight_requests(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    model = Model(gate)
    batcher = make(model, executor=executor)
    running = asyncio.create_task(batcher.submit(req(1.0), 1))
    await ticks()
    queued = asyncio.create_task(batcher.submit(req(2.0), 1))
    await ticks()
    draining = asyncio.create_task(batcher.drain())
    await ticks()
    assert not draining.done()

    gate.set()
    await draining
    assert running.done()
    assert queued.done()
    assert batcher.in_flight == 0
    assert batcher.queued_rows == 0
    assert model.batch_rows == [1, 1]


async def test_drain_of_an_idle_batcher_returns_at_once() -> None:
    batcher = make(Model())
    task = asyncio.create_task(batcher.drain())
    await ticks(2)
    assert task.done()


async def test_close_fails_queued_requests_with_unavailable(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    model = Model(gate)
    batcher = make(model, executor=executor)
    running = asyncio.create_task(batcher.submit(req(1.0), 1))
    await ticks()
    queued = asyncio.create_task(batcher.submit(req(2.0), 1))
    await ticks()

    batcher.close()
    with pytest.raises(Unavailable):
        await queued
    assert batcher.queued_rows == 0
    gate.set()
    assert_answer(await running, req(1.0))  # already running: finishes normally
    assert model.batch_rows == [1]


async def test_submit_after_close_raises_unavailable() -> None:
    model = Model()
    batcher = make(model)
    batcher.close()
    with pytest.raises(Unavailable):
        await batcher.submit(req(1.0), 1)
    assert model.batches == []


# ---- observer -------------------------------------------------------------------------------


async def test_observer_receives_rows_queue_waits_and_compute_time_per_batch(
    gate: threading.Event, executor: ThreadPoolExecutor
) -> None:
    clock = FakeClock(start=1000.0)
    observer = Observer()
    model = Model(gate, clock=clock, cost=0.125)
    batcher = make(model, clock, executor=executor, observer=observer)
    running = asyncio.create_task(batcher.submit(req(1.0), 1))  # cut at 1000.0
    await ticks()
    clock.advance(0.25)
    two = asyncio.create_task(batcher.submit(req(2.0, rows=2), 2))  # queued at 1000.25
    await ticks()
    clock.advance(0.5)
    one = asyncio.create_task(batcher.submit(req(3.0), 1))  # queued at 1000.75
    await ticks()
    clock.advance(1.0)  # now 1001.75; the first batch finishes at 1001.875

    gate.set()
    await asyncio.gather(running, two, one)
    assert observer.batches == [
        (1, [0.0], pytest.approx(1.875), True),
        (3, [pytest.approx(1.625), pytest.approx(1.125)], pytest.approx(0.125), True),
    ]
    assert observer.drops == []
