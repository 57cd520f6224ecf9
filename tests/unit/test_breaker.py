"""The circuit breaker's state machine, driven by plain float clock values (no sleeps)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    Permit,
    Transition,
    TransitionReason,
)

CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN
T0 = 1000.0


def _breaker(
    events: list[Transition] | None = None, **overrides: Any
) -> tuple[CircuitBreaker, list[Transition]]:
    settings_: dict[str, Any] = {
        "sliding_window_size": 10,
        "minimum_number_of_calls": 10,
        "wait_duration_in_open_s": 5.0,
        "permitted_calls_in_half_open": 3,
    }
    settings_.update(overrides)
    seen = events if events is not None else []
    return CircuitBreaker("model", BreakerConfig(**settings_), on_transition=seen.append), seen


def _call(
    breaker: CircuitBreaker, now: float, *, ok: bool = True, duration_s: float = 0.01
) -> Permit:
    permit = breaker.allow(now)
    assert permit is not None, f"rejected in {breaker.state}"
    breaker.record(permit, ok, duration_s, now)
    return permit


def _open(breaker: CircuitBreaker, now: float = T0) -> None:
    while breaker.state is CLOSED:
        _call(breaker, now, ok=False)
    assert breaker.state is OPEN


def _half_open(breaker: CircuitBreaker, now: float = T0) -> float:
    _open(breaker, now)
    later = now + breaker.config.wait_duration_in_open_s + 0.001
    assert breaker.allow(later) is not None
    assert breaker.state is HALF_OPEN
    return later


# ---- CLOSED ----------------------------------------------------------------------------------


def test_stays_closed_below_minimum_calls_even_when_every_call_fails() -> None:
    breaker, events = _breaker()
    for _ in range(9):
        _call(breaker, T0, ok=False)
    assert breaker.state is CLOSED
    assert events == []
    assert breaker.metrics(T0).failure_rate == -1.0
    assert breaker.metrics(T0).buffered_calls == 9


def test_opens_at_exactly_the_failure_rate_threshold() -> None:
    breaker, events = _breaker(failure_rate_threshold=50)
    for i in range(10):
        _call(breaker, T0, ok=i % 2 == 0)
    assert breaker.state is OPEN
    assert len(events) == 1
    assert events[0].reason is TransitionReason.FAILURE_RATE
    assert events[0].failure_rate == 50.0


def test_stays_closed_just_below_the_failure_rate_threshold() -> None:
    breaker, _ = _breaker(failure_rate_threshold=50)
    for i in range(10):
        _call(breaker, T0, ok=i >= 4)  # 4 failures in 10: 40%
    assert breaker.state is CLOSED
    assert breaker.metrics(T0).failure_rate == 40.0


def test_opens_on_slow_call_rate() -> None:
    breaker, events = _breaker(slow_call_rate_threshold=60, slow_call_duration_s=0.5)
    for i in range(10):
        _call(breaker, T0, ok=True, duration_s=0.6 if i < 6 else 0.1)
    assert breaker.state is OPEN
    assert events[0].reason is TransitionReason.SLOW_CALL_RATE
    assert events[0].slow_call_rate == 60.0
    assert events[0].failure_rate == 0.0


def test_the_default_slow_threshold_of_100_opens_only_when_every_call_is_slow() -> None:
    # resilience4j: slowCallRateThreshold 100 is a threshold like any other (rate >= 100).
    breaker, events = _breaker(slow_call_duration_s=1.0)
    for i in range(10):
        _call(breaker, T0, ok=True, duration_s=0.5 if i == 0 else 30.0)
    assert breaker.state is CLOSED
    assert breaker.metrics(T0).slow_call_rate == 90.0
    _call(breaker, T0, ok=True, duration_s=30.0)  # the fast call slides out: 10 of 10 slow
    assert breaker.state is OPEN
    assert events[-1].reason is TransitionReason.SLOW_CALL_RATE


def test_a_call_as_long_as_the_slow_threshold_is_not_slow() -> None:
    # resilience4j: slow when duration > slowCallDurationThreshold (strictly).
    breaker, _ = _breaker(slow_call_duration_s=1.0, slow_call_rate_threshold=50)
    for _ in range(10):
        _call(breaker, T0, ok=True, duration_s=1.0)
    assert breaker.state is CLOSED
    assert breaker.metrics(T0).slow_call_rate == 0.0


def test_count_window_slides_old_failures_out() -> None:
    breaker, _ = _breaker(failure_rate_threshold=50)
    for _ in range(4):
        _call(breaker, T0, ok=False)
    for _ in range(6):
        _call(breaker, T0, ok=True)
    assert breaker.metrics(T0).failure_rate == 40.0
    for _ in range(4):
        _call(breaker, T0, ok=True)  # pushes the four failures out
    metrics = breaker.metrics(T0)
    assert metrics.failure_rate == 0.0
    assert metrics.buffered_calls == 10
    assert breaker.state is CLOSED


def test_count_window_minimum_is_clamped_to_the_window_size() -> None:
    breaker, _ = _breaker(sliding_window_size=4, minimum_number_of_calls=100)
    for _ in range(4):
        _call(breaker, T0, ok=False)
    assert breaker.state is OPEN


def test_time_window_expires_old_buckets() -> None:
    breaker, _ = _breaker(
        sliding_window_type="time", sliding_window_size=10, minimum_number_of_calls=5
    )
    for _ in range(4):
        _call(breaker, T0, ok=False)
    assert breaker.metrics(T0 + 9.5).buffered_calls == 4  # second 1009 still in the window
    assert breaker.metrics(T0 + 10.0).buffered_calls == 0  # second 1000 has left it
    _call(breaker, T0 + 10.0, ok=False)
    assert breaker.state is CLOSED  # the four old failures no longer count toward five


def test_time_window_opens_on_failures_within_the_window() -> None:
    breaker, _ = _breaker(
        sliding_window_type="time", sliding_window_size=10, minimum_number_of_calls=5
    )
    for i in range(5):
        _call(breaker, T0 + 2 * i, ok=False)  # seconds 1000..1008, all inside 10 s
    assert breaker.state is OPEN


def test_time_window_after_a_long_gap_starts_empty() -> None:
    breaker, _ = _breaker(sliding_window_type="time", sliding_window_size=3)
    _call(breaker, T0, ok=False)
    _call(breaker, T0 + 1, ok=True)
    assert breaker.metrics(T0 + 1000.0).buffered_calls == 0


# ---- OPEN ------------------------------------------------------------------------------------


def test_open_rejects_until_the_wait_has_passed_then_moves_to_half_open() -> None:
    breaker, events = _breaker(wait_duration_in_open_s=5.0)
    _open(breaker)
    assert breaker.allow(T0) is None
    assert breaker.allow(T0 + 4.999) is None
    assert breaker.allow(T0 + 5.0) is None  # resilience4j: strictly after the wait
    assert breaker.state is OPEN
    assert breaker.metrics(T0).not_permitted_calls == 3
    assert breaker.allow(T0 + 5.001) is not None
    assert breaker.state is HALF_OPEN
    assert events[-1].from_state is OPEN
    assert events[-1].to_state is HALF_OPEN
    assert events[-1].reason is TransitionReason.WAIT_ELAPSED


def test_open_keeps_the_window_that_tripped_it_in_metrics() -> None:
    breaker, _ = _breaker()
    _open(breaker)
    metrics = breaker.metrics(T0 + 1.0)
    assert metrics.state is OPEN
    assert metrics.failure_rate == 100.0


# ---- HALF_OPEN -------------------------------------------------------------------------------


def test_half_open_admits_exactly_n_concurrent_probes() -> None:
    breaker, _ = _breaker(permitted_calls_in_half_open=3)
    now = _half_open(breaker)  # the first probe is admitted by _half_open
    assert breaker.allow(now) is not None
    assert breaker.allow(now) is not None
    assert breaker.allow(now) is None
    assert breaker.allow(now + 100.0) is None
    assert breaker.state is HALF_OPEN


def test_half_open_probes_all_ok_close_with_an_empty_window() -> None:
    breaker, events = _breaker(permitted_calls_in_half_open=3)
    _open(breaker)
    later = T0 + 5.001
    probes = [breaker.allow(later) for _ in range(3)]
    for probe in probes:
        assert probe is not None
        breaker.record(probe, True, 0.01, later)
    assert breaker.state is CLOSED
    assert (events[-1].from_state, events[-1].to_state) == (HALF_OPEN, CLOSED)
    assert events[-1].reason is TransitionReason.PROBES_SUCCEEDED
    metrics = breaker.metrics(later)
    assert metrics.buffered_calls == 0
    assert metrics.failure_rate == -1.0


def test_half_open_verdict_waits_for_every_probe_when_the_minimum_exceeds_them() -> None:
    breaker, _ = _breaker(permitted_calls_in_half_open=3)
    _open(breaker)
    later = T0 + 5.001
    probes = [breaker.allow(later) for _ in range(3)]
    assert all(p is not None for p in probes)
    for probe in probes[:2]:
        assert probe is not None
        breaker.record(probe, True, 0.01, later)
        assert breaker.state is HALF_OPEN


def test_half_open_failing_probes_reopen_and_a_new_wait_starts() -> None:
    breaker, events = _breaker(permitted_calls_in_half_open=3, failure_rate_threshold=50)
    _open(breaker)
    later = T0 + 5.001
    probes = [breaker.allow(later) for _ in range(3)]
    reopened_at = later + 2.0
    for probe, ok in zip(probes, (True, False, False), strict=True):
        assert probe is not None
        breaker.record(probe, ok, 0.01, reopened_at)
    assert breaker.state is OPEN
    assert (events[-1].from_state, events[-1].to_state) == (HALF_OPEN, OPEN)
    assert events[-1].reason is TransitionReason.FAILURE_RATE
    assert breaker.allow(reopened_at + 4.9) is None  # the wait counts from the reopening
    assert breaker.allow(reopened_at + 5.001) is not None
    assert breaker.state is HALF_OPEN


def test_half_open_slow_probes_reopen() -> None:
    breaker, events = _breaker(
        permitted_calls_in_half_open=2, slow_call_rate_threshold=50, slow_call_duration_s=1.0
    )
    _open(breaker)
    later = T0 + 5.001
    first, second = breaker.allow(later), breaker.allow(later)
    assert first is not None
    assert second is not None
    breaker.record(first, True, 0.1, later)
    breaker.record(second, True, 1.5, later)
    assert breaker.state is OPEN
    assert events[-1].reason is TransitionReason.SLOW_CALL_RATE


def test_release_frees_a_half_open_slot_without_counting() -> None:
    breaker, _ = _breaker(permitted_calls_in_half_open=2)
    _open(breaker)
    later = T0 + 5.001
    first, second = breaker.allow(later), breaker.allow(later)
    assert first is not None
    assert second is not None
    assert breaker.allow(later) is None
    breaker.release(first, later)
    breaker.release(first, later)  # a second release frees nothing more
    third = breaker.allow(later)
    assert third is not None
    assert breaker.allow(later) is None
    assert breaker.metrics(later).buffered_calls == 0
    breaker.record(second, True, 0.01, later)
    breaker.record(third, True, 0.01, later)
    assert breaker.state is CLOSED


def test_half_open_probe_recorded_twice_counts_once() -> None:
    breaker, _ = _breaker(permitted_calls_in_half_open=2)
    _open(breaker)
    later = T0 + 5.001
    probe = breaker.allow(later)
    assert probe is not None
    breaker.record(probe, True, 0.01, later)
    breaker.record(probe, True, 0.01, later)
    assert breaker.state is HALF_OPEN
    assert breaker.metrics(later).buffered_calls == 1


def test_half_open_reopens_after_max_wait_without_a_verdict() -> None:
    breaker, events = _breaker(permitted_calls_in_half_open=2, max_wait_in_half_open_s=3.0)
    now = _half_open(breaker)
    assert breaker.allow(now + 2.9) is not None
    assert breaker.allow(now + 3.0) is None  # the half-open timer fires at t + max wait
    assert breaker.state is OPEN
    assert events[-1].reason is TransitionReason.HALF_OPEN_TIMEOUT
    assert breaker.allow(now + 7.9) is None
    assert breaker.allow(now + 8.001) is not None  # a fresh wait from the timeout


# ---- stale permits ---------------------------------------------------------------------------


def test_a_closed_permit_recorded_after_opening_is_ignored() -> None:
    breaker, _ = _breaker(permitted_calls_in_half_open=1)
    early = breaker.allow(T0)
    assert early is not None
    _open(breaker)
    later = T0 + 5.001
    probe = breaker.allow(later)
    assert probe is not None
    breaker.record(early, False, 10.0, later)  # stale: must not fail the half-open verdict
    assert breaker.state is HALF_OPEN
    assert breaker.metrics(later).buffered_calls == 0
    breaker.record(probe, True, 0.01, later)
    assert breaker.state is CLOSED


def test_a_probe_recorded_after_closing_does_not_count_in_the_new_window() -> None:
    breaker, _ = _breaker(permitted_calls_in_half_open=2)
    _open(breaker)
    later = T0 + 5.001
    first, second = breaker.allow(later), breaker.allow(later)
    assert first is not None
    assert second is not None
    breaker.record(first, True, 0.01, later)
    breaker.release(second, later)
    third = breaker.allow(later)
    assert third is not None
    breaker.record(third, True, 0.01, later)
    assert breaker.state is CLOSED
    breaker.record(second, False, 0.01, later)  # released then recorded late: stale
    assert breaker.metrics(later).buffered_calls == 0


# ---- on_transition ---------------------------------------------------------------------------


def test_on_transition_is_called_once_per_transition_with_from_and_to() -> None:
    breaker, events = _breaker(permitted_calls_in_half_open=1)
    _open(breaker)
    probe = breaker.allow(T0 + 5.001)
    assert probe is not None
    breaker.allow(T0 + 5.001)  # rejected: no transition
    breaker.record(probe, True, 0.01, T0 + 6.0)
    assert [(e.from_state, e.to_state, e.at) for e in events] == [
        (CLOSED, OPEN, T0),
        (OPEN, HALF_OPEN, T0 + 5.001),
        (HALF_OPEN, CLOSED, T0 + 6.0),
    ]
    assert all(e.name == "model" for e in events)


def test_operator_switches_force_open_disable_and_reset() -> None:
    breaker, events = _breaker()
    breaker.force_open(T0)
    assert breaker.allow(T0 + 1e6) is None
    breaker.disable(T0)
    for _ in range(50):
        _call(breaker, T0, ok=False)
    assert breaker.state is BreakerState.DISABLED
    breaker.reset(T0)
    assert breaker.state is CLOSED
    assert [e.reason for e in events] == [
        TransitionReason.FORCED_OPEN,
        TransitionReason.DISABLED,
        TransitionReason.RESET,
    ]


# ---- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_rate_threshold", 0),
        ("failure_rate_threshold", 100.5),
        ("slow_call_rate_threshold", -1),
        ("slow_call_duration_s", 0),
        ("sliding_window_type", "sessions"),
        ("sliding_window_size", 0),
        ("sliding_window_size", 2.5),
        ("minimum_number_of_calls", True),
        ("wait_duration_in_open_s", -0.1),
        ("wait_duration_in_open_s", float("nan")),
        ("permitted_calls_in_half_open", 0),
        ("max_wait_in_half_open_s", "3s"),
    ],
)
def test_config_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        BreakerConfig(**{field: value})


def test_config_defaults_follow_resilience4j() -> None:
    config = BreakerConfig()
    assert config.failure_rate_threshold == 50.0
    assert config.sliding_window_type == "count"
    assert config.sliding_window_size == 100
    assert config.minimum_number_of_calls == 20  # batchline's (resilience4j: 100)
    assert config.slow_call_rate_threshold == 100.0
    assert config.slow_call_duration_s == 60.0
    assert config.wait_duration_in_open_s == 5.0  # batchline's (resilience4j: 60 s)
    assert config.permitted_calls_in_half_open == 5  # batchline's (resilience4j: 10)


def test_from_mapping_builds_a_config_and_accepts_integer_seconds() -> None:
    config = BreakerConfig.from_mapping(
        "models.churn.breaker",
        {"sliding_window_type": "time", "sliding_window_size": 30, "wait_duration_in_open_s": 10},
    )
    assert config == BreakerConfig(
        sliding_window_type="time", sliding_window_size=30, wait_duration_in_open_s=10.0
    )
    assert isinstance(config.wait_duration_in_open_s, float)


def test_from_mapping_rejects_unknown_keys_naming_prefix_and_key() -> None:
    with pytest.raises(ValueError, match=r"unknown key models\.churn\.breaker\.failure_rate\b"):
        BreakerConfig.from_mapping("models.churn.breaker", {"failure_rate": 50})


def test_from_mapping_rejects_bad_values_naming_prefix_and_key() -> None:
    with pytest.raises(ValueError, match=r"^breaker\.permitted_calls_in_half_open: "):
        BreakerConfig.from_mapping("breaker", {"permitted_calls_in_half_open": "five"})


# ---- resilience4j scenario table -------------------------------------------------------------
#
# Each trace is written by hand from resilience4j's documentation (CircuitBreaker: "count-based
# sliding window", "minimumNumberOfCalls", "permittedNumberOfCallsInHalfOpenState", "slow calls")
# and its CircuitBreakerStateMachine: HALF_OPEN judges with min(minimumNumberOfCalls,
# permittedNumberOfCallsInHalfOpenState) calls; rates are compared with >=; a call is slow when
# its duration is > slowCallDurationThreshold; OPEN moves on when now is after open + wait.
# Steps: S a fast success, F a fast failure, L a slow success (2 s), E exactly 1 s (not slow),
# "+x" advances the clock by x seconds, "?" an allow whose answer is checked ("y"/"n") instead
# of a state. The expected column names the state after each step.

_SCENARIOS: dict[str, tuple[dict[str, Any], str, str]] = {
    "half-open F,F re-opens after the 2nd (min 2 < probes 5)": (
        {"minimum_number_of_calls": 2, "permitted_calls_in_half_open": 5},
        "F F +10.5 F F",
        "C O H O",
    ),
    "half-open S,S closes (min 2 < probes 5)": (
        {"minimum_number_of_calls": 2, "permitted_calls_in_half_open": 5},
        "F F +10.5 S S",
        "C O H C",
    ),
    "half-open S then F re-opens at 50 %": (
        {"minimum_number_of_calls": 2, "permitted_calls_in_half_open": 5},
        "F F +10.5 S F",
        "C O H O",
    ),
    "half-open F,F,S,S,S with min 5 closes on the 5th (40 %)": (
        {"minimum_number_of_calls": 5, "permitted_calls_in_half_open": 5},
        "F F F F F +10.5 F F S S S",
        "C C C C O H H H H C",
    ),
    "half-open F,F,F,S,S with min 5 re-opens on the 5th (60 %)": (
        {"minimum_number_of_calls": 5, "permitted_calls_in_half_open": 5},
        "F F F F F +10.5 F F F S S",
        "C C C C O H H H H O",
    ),
    "count window: 2 of 4 failed opens at exactly 50 %": (
        {"sliding_window_size": 4, "minimum_number_of_calls": 4},
        "S F S F",
        "C C C O",
    ),
    "count window: 1 of 4 failed stays closed, the oldest slides out": (
        {"sliding_window_size": 4, "minimum_number_of_calls": 4},
        "F S S S S F F",
        "C C C C C C O",
    ),
    "slow threshold 100: opens when every call is slow": (
        {"sliding_window_size": 3, "minimum_number_of_calls": 3, "slow_call_duration_s": 1.0},
        "L L S L L L",
        "C C C C C O",
    ),
    "a call exactly at the slow duration is not slow": (
        {
            "sliding_window_size": 3,
            "minimum_number_of_calls": 3,
            "slow_call_duration_s": 1.0,
            "slow_call_rate_threshold": 50,
        },
        "E E E L L",
        "C C C C O",
    ),
    "open: rejected at exactly the wait, half-open just after": (
        {"minimum_number_of_calls": 2, "permitted_calls_in_half_open": 2},
        "F F +10 ? +0.001 ?",
        "C O n y",
    ),
    "half-open: exactly N permits, recorded probes keep their slot": (
        {"minimum_number_of_calls": 3, "permitted_calls_in_half_open": 3},
        "F F F +10.5 S S ? ? ?",
        "C C O H H y n n",
    ),
}


@pytest.mark.parametrize("name", sorted(_SCENARIOS))
def test_resilience4j_scenario(name: str) -> None:
    overrides, steps, expected = _SCENARIOS[name]
    config = {"sliding_window_size": 10, "wait_duration_in_open_s": 10.0, **overrides}
    breaker = CircuitBreaker("r4j", BreakerConfig(**config))
    letters = {"C": CLOSED, "O": OPEN, "H": HALF_OPEN}
    durations = {"S": 0.01, "F": 0.01, "L": 2.0, "E": 1.0}
    now = T0
    want = iter(expected.split())
    for step in steps.split():
        if step.startswith("+"):
            now += float(step[1:])
            continue
        if step == "?":
            answer = "n" if breaker.allow(now) is None else "y"
            assert answer == next(want), f"{name}: allow at {now - T0:g}"
            continue
        permit = breaker.allow(now)
        assert permit is not None, f"{name}: {step} rejected in {breaker.state}"
        breaker.record(permit, step != "F", durations[step], now)
        assert breaker.state is letters[next(want)], f"{name}: after {step} at {now - T0:g}"
    assert next(want, None) is None, f"{name}: expected column longer than the steps"


# ---- random sequences ------------------------------------------------------------------------

LEGAL = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}


class BreakerMachine(RuleBasedStateMachine):
    """Random allow / record / release / advance-time sequences keep the breaker's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.events: list[Transition] = []
        self.breaker = CircuitBreaker("m", BreakerConfig(), on_transition=self.events.append)
        self.checked_events = 0
        self.opened_at = -1.0
        # (permit, half-open episode it was issued in, or -1 when not a probe)
        self.permits: list[tuple[Permit, int]] = []
        self.episode = 0

    @initialize(
        window=st.sampled_from(["count", "time"]),
        size=st.integers(1, 6),
        minimum=st.integers(1, 4),
        probes=st.integers(1, 4),
        wait=st.sampled_from([0.0, 0.5, 2.0, 5.0]),
        threshold=st.sampled_from([25.0, 50.0, 100.0]),
        slow_threshold=st.sampled_from([50.0, 100.0]),
        max_wait=st.sampled_from([0.0, 3.0]),
    )
    def configure(
        self,
        window: str,
        size: int,
        minimum: int,
        probes: int,
        wait: float,
        threshold: float,
        slow_threshold: float,
        max_wait: float,
    ) -> None:
        config = BreakerConfig.from_mapping(
            "breaker",
            {
                "sliding_window_type": window,
                "sliding_window_size": size,
                "minimum_number_of_calls": minimum,
                "permitted_calls_in_half_open": probes,
                "wait_duration_in_open_s": wait,
                "failure_rate_threshold": threshold,
                "slow_call_rate_threshold": slow_threshold,
                "slow_call_duration_s": 1.0,
                "max_wait_in_half_open_s": max_wait,
            },
        )
        self.breaker = CircuitBreaker("m", config, on_transition=self.events.append)

    def _absorb_events(self) -> None:
        for event in self.events[self.checked_events :]:
            assert (event.from_state, event.to_state) in LEGAL, event
            if event.to_state is OPEN:
                self.opened_at = event.at
            if event.to_state is HALF_OPEN:
                self.episode += 1
        self.checked_events = len(self.events)

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 20.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def allow(self) -> None:
        before = self.breaker.state
        permit = self.breaker.allow(self.now)
        self._absorb_events()
        wait = self.breaker.config.wait_duration_in_open_s
        if before is OPEN:
            assert (permit is not None) == (self.now > self.opened_at + wait)
        if permit is not None:
            probe = self.breaker.state is HALF_OPEN
            self.permits.append((permit, self.episode if probe else -1))
        else:
            assert self.breaker.state in (OPEN, HALF_OPEN)

    @rule(ok=st.booleans(), slow=st.booleans())
    def call(self, ok: bool, slow: bool) -> None:
        """allow, then record at once: the common path, and the quickest way between states."""
        self.allow()
        if self.permits:
            self._record(len(self.permits) - 1, ok, slow)

    @precondition(lambda self: self.permits)
    @rule(index=st.integers(0, 50), ok=st.booleans(), slow=st.booleans())
    def record(self, index: int, ok: bool, slow: bool) -> None:
        self._record(index, ok, slow)

    def _record(self, index: int, ok: bool, slow: bool) -> None:
        permit, _ = self.permits.pop(index % len(self.permits))
        before = self.breaker.state
        self.breaker.record(permit, ok, 2.0 if slow else 0.1, self.now)
        self._absorb_events()
        if before is CLOSED and self.breaker.state is CLOSED:
            # A record that leaves the breaker CLOSED leaves it below every threshold.
            metrics = self.breaker.metrics(self.now)
            config = self.breaker.config
            assert metrics.failure_rate < config.failure_rate_threshold
            assert metrics.slow_call_rate < config.slow_call_rate_threshold

    @precondition(lambda self: self.permits)
    @rule(index=st.integers(0, 50))
    def release(self, index: int) -> None:
        permit, _ = self.permits.pop(index % len(self.permits))
        self.breaker.release(permit, self.now)
        self._absorb_events()

    @invariant()
    def half_open_never_exceeds_its_probes(self) -> None:
        if self.breaker.state is HALF_OPEN:
            outstanding = sum(1 for _, episode in self.permits if episode == self.episode)
            recorded = self.breaker.metrics(self.now).buffered_calls
            assert outstanding + recorded <= self.breaker.config.permitted_calls_in_half_open

    @invariant()
    def transitions_chain_along_legal_edges(self) -> None:
        for earlier, later in zip(self.events, self.events[1:], strict=False):
            assert earlier.to_state is later.from_state
            assert earlier.at <= later.at


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
