"""The batcher's pure parts: the flush decision, shape grouping, stacking and splitting rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.batching import CUT, HOLD, BatchPolicy, Decision, decide, shape_key, split_rows, stack
from server.clock import FakeClock

DELAY = 0.005


def _decide(
    policy: BatchPolicy,
    clock: FakeClock,
    *,
    queued_rows: int,
    oldest_enqueued: float,
    free_instances: int = 1,
    in_flight: int = 0,
    busy: bool = False,
) -> Decision:
    return decide(
        policy,
        queued_rows=queued_rows,
        oldest_enqueued=oldest_enqueued,
        now=clock.now(),
        free_instances=free_instances,
        in_flight=in_flight,
        busy=busy,
    )


# ---- decide ---------------------------------------------------------------------------------


def test_lone_request_is_cut_at_once_when_idle() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=10.0)
    assert _decide(policy, clock, queued_rows=1, oldest_enqueued=clock.now()) == CUT


def test_empty_queue_is_held_without_a_wake_up() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=DELAY)
    decision = _decide(policy, clock, queued_rows=0, oldest_enqueued=clock.now() - 1.0)
    assert decision == HOLD
    assert decision.wake_at is None


def test_no_free_instance_holds_even_a_full_overdue_queue() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=DELAY)
    decision = _decide(
        policy,
        clock,
        queued_rows=4,
        oldest_enqueued=clock.now() - 1.0,
        free_instances=0,
        in_flight=1,
    )
    assert decision == HOLD
    assert decision.wake_at is None


def test_full_batch_is_cut_while_other_batches_run() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=10.0, instances=2)
    decision = _decide(
        policy, clock, queued_rows=4, oldest_enqueued=clock.now(), free_instances=1, in_flight=1
    )
    assert decision == CUT


def test_more_rows_than_a_batch_are_cut_at_once() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=10.0, instances=2)
    decision = _decide(
        policy, clock, queued_rows=9, oldest_enqueued=clock.now(), free_instances=1, in_flight=1
    )
    assert decision == CUT


@pytest.mark.parametrize(
    ("in_flight", "busy"), [(1, False), (0, True), (1, True)], ids=["in-flight", "busy", "both"]
)
def test_partial_batch_waits_until_oldest_plus_delay_when_not_idle(
    in_flight: int, busy: bool
) -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=DELAY, instances=2)
    oldest = clock.now()
    clock.advance(DELAY / 2)
    decision = _decide(
        policy, clock, queued_rows=3, oldest_enqueued=oldest, in_flight=in_flight, busy=busy
    )
    assert not decision.cut
    assert decision.wake_at == oldest + DELAY


@pytest.mark.parametrize("past", [0.0, DELAY, 1.0], ids=["at", "after", "long-after"])
def test_partial_batch_is_cut_once_the_delay_has_passed(past: float) -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=DELAY, instances=2)
    oldest = clock.now()
    clock.advance(DELAY + past)
    decision = _decide(policy, clock, queued_rows=3, oldest_enqueued=oldest, in_flight=1, busy=True)
    assert decision == CUT


def test_zero_delay_cuts_a_partial_batch_while_busy() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.0, instances=2)
    decision = _decide(
        policy, clock, queued_rows=1, oldest_enqueued=clock.now(), in_flight=1, busy=True
    )
    assert decision == CUT


def test_preferred_sizes_make_an_idle_queue_wait_to_reach_one() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=16, max_queue_delay_s=DELAY, preferred_batch_sizes=(4, 8))
    oldest = clock.now()
    decision = _decide(policy, clock, queued_rows=3, oldest_enqueued=oldest)
    assert not decision.cut
    assert decision.wake_at == oldest + DELAY


@pytest.mark.parametrize("rows", [4, 8])
def test_reaching_a_preferred_size_cuts_at_once(rows: int) -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=16, max_queue_delay_s=10.0, preferred_batch_sizes=(4, 8))
    assert _decide(policy, clock, queued_rows=rows, oldest_enqueued=clock.now()) == CUT


def test_between_preferred_sizes_waits_for_the_next() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=16, max_queue_delay_s=DELAY, preferred_batch_sizes=(4, 8))
    oldest = clock.now()
    decision = _decide(policy, clock, queued_rows=5, oldest_enqueued=oldest)
    assert not decision.cut
    assert decision.wake_at == oldest + DELAY


def test_preferred_size_wait_ends_at_the_delay() -> None:
    clock = FakeClock()
    policy = BatchPolicy(max_batch_size=16, max_queue_delay_s=DELAY, preferred_batch_sizes=(4, 8))
    oldest = clock.now()
    clock.advance(DELAY)
    assert _decide(policy, clock, queued_rows=3, oldest_enqueued=oldest) == CUT


def test_largest_preferred_size_cuts_even_while_other_batches_run() -> None:
    clock = FakeClock()
    policy = BatchPolicy(
        max_batch_size=16, max_queue_delay_s=10.0, preferred_batch_sizes=(4, 8), instances=2
    )
    decision = _decide(policy, clock, queued_rows=8, oldest_enqueued=clock.now(), in_flight=1)
    assert decision == CUT


@settings(deadline=None)  # a loaded CI machine must not turn slowness into failure
@given(
    queued_rows=st.integers(1, 40),
    waited=st.floats(0.0, 0.02),
    free=st.integers(1, 3),
    in_flight=st.integers(0, 3),
    busy=st.booleans(),
    preferred=st.lists(st.integers(1, 16), max_size=3, unique=True),
)
def test_non_empty_queue_with_a_free_instance_either_cuts_or_names_a_wake_up(
    queued_rows: int, waited: float, free: int, in_flight: int, busy: bool, preferred: list[int]
) -> None:
    """A held non-empty queue always says when to look again, never later than oldest + delay."""
    clock = FakeClock()
    policy = BatchPolicy(
        max_batch_size=16,
        max_queue_delay_s=DELAY,
        preferred_batch_sizes=tuple(preferred),
        instances=4,
    )
    oldest = clock.now()
    clock.advance(waited)
    decision = _decide(
        policy,
        clock,
        queued_rows=queued_rows,
        oldest_enqueued=oldest,
        free_instances=free,
        in_flight=in_flight,
        busy=busy,
    )
    if not decision.cut:
        assert decision.wake_at is not None
        assert clock.now() < decision.wake_at <= oldest + DELAY
    if queued_rows >= 16:
        assert decision.cut


# ---- shape_key / stack / split_rows ---------------------------------------------------------


def test_shape_key_ignores_the_batch_dimension() -> None:
    a = {"x": np.zeros((1, 3)), "y": np.zeros((1, 2, 2))}
    b = {"x": np.zeros((7, 3)), "y": np.zeros((7, 2, 2))}
    assert shape_key(a) == shape_key(b) == ((3,), (2, 2))


def test_shape_key_differs_when_a_non_batch_dimension_differs() -> None:
    assert shape_key({"x": np.zeros((2, 3))}) != shape_key({"x": np.zeros((2, 4))})


def test_stack_concatenates_every_input_along_rows_in_caller_order() -> None:
    a = {"x": np.array([[1, 1]]), "y": np.array([10])}
    b = {"x": np.array([[2, 2], [3, 3]]), "y": np.array([20, 30])}
    out = stack([a, b])
    np.testing.assert_array_equal(out["x"], [[1, 1], [2, 2], [3, 3]])
    np.testing.assert_array_equal(out["y"], [10, 20, 30])


def test_stack_of_one_caller_returns_its_arrays_without_copying() -> None:
    a = {"x": np.arange(6).reshape(3, 2)}
    assert stack([a])["x"] is a["x"]


@settings(deadline=None)
@given(counts=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_split_rows_of_stack_returns_each_callers_rows_in_order(counts: list[int]) -> None:
    callers = []
    start = 0
    for rows in counts:
        ids = np.arange(start, start + rows)
        callers.append(
            {
                "x": np.stack([ids, -ids], axis=1).astype(np.float32),
                "s": ids.astype(np.int64),
            }
        )
        start += rows
    stacked = stack(callers)
    parts = split_rows([stacked["x"], stacked["s"]], counts)
    assert len(parts) == len(callers)
    for caller, (x, s) in zip(callers, parts, strict=True):
        np.testing.assert_array_equal(x, caller["x"])
        np.testing.assert_array_equal(s, caller["s"])


@pytest.mark.parametrize("counts", [[6], [1, 2, 3]], ids=["one-caller", "three-callers"])
def test_split_rows_returns_views_of_the_outputs(counts: list[int]) -> None:
    out = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.arange(6)
    parts = split_rows([out, labels], counts)
    assert len(parts) == len(counts)
    start = 0
    for (x, label), rows in zip(parts, counts, strict=True):
        assert np.shares_memory(x, out)
        assert np.shares_memory(label, labels)
        np.testing.assert_array_equal(x, out[start : start + rows])
        start += rows


def test_busy_queue_cuts_once_the_last_batchs_crowd_is_back() -> None:
    """Closed-loop callers return together: no need to wait out the delay for more."""
    policy = BatchPolicy(max_batch_size=64, max_queue_delay_s=0.002)
    waiting = decide(
        policy, queued_rows=3, oldest_enqueued=10.0, now=10.0001, free_instances=1,
        in_flight=0, busy=True, queued_requests=3, crowd=4,
    )  # fmt: skip
    assert not waiting.cut
    assert waiting.wake_at == pytest.approx(10.002)
    back = decide(
        policy, queued_rows=4, oldest_enqueued=10.0, now=10.0001, free_instances=1,
        in_flight=0, busy=True, queued_requests=4, crowd=4,
    )  # fmt: skip
    assert back.cut


def test_a_crowd_of_one_never_cuts_early() -> None:
    policy = BatchPolicy(max_batch_size=64, max_queue_delay_s=0.002)
    decision = decide(
        policy, queued_rows=1, oldest_enqueued=10.0, now=10.0001, free_instances=1,
        in_flight=1, busy=True, queued_requests=1, crowd=1,
    )  # fmt: skip
    assert not decision.cut


def test_a_quiet_loop_cuts_a_partial_batch_that_was_waiting_for_company() -> None:
    """Work-conserving: once no request has come for QUIET_TURNS turns, waiting only idles."""
    policy = BatchPolicy(max_batch_size=64, max_queue_delay_s=0.002)
    common = dict(queued_rows=3, oldest_enqueued=10.0, now=10.0001, free_instances=1)
    for in_flight, busy in [(0, True), (1, False), (1, True)]:
        waiting = decide(policy, **common, in_flight=in_flight, busy=busy, quiet=False)  # type: ignore[arg-type]
        assert waiting == Decision(cut=False, wake_at=pytest.approx(10.002))
        assert decide(policy, **common, in_flight=in_flight, busy=busy, quiet=True) == CUT  # type: ignore[arg-type]


def test_a_quiet_loop_neither_frees_an_instance_nor_overrides_preferred_sizes() -> None:
    held = decide(
        BatchPolicy(max_batch_size=64), queued_rows=3, oldest_enqueued=10.0, now=10.0001,
        free_instances=0, in_flight=1, busy=True, quiet=True,
    )  # fmt: skip
    assert held == HOLD
    preferred = BatchPolicy(max_batch_size=64, max_queue_delay_s=0.002, preferred_batch_sizes=(8,))
    waiting = decide(
        preferred, queued_rows=3, oldest_enqueued=10.0, now=10.0001, free_instances=1,
        in_flight=0, busy=True, quiet=True,
    )  # fmt: skip
    assert waiting == Decision(cut=False, wake_at=pytest.approx(10.002))
