"""Circuit breaking around a model call: resilience4j's state machine, kept pure.

`CircuitBreaker` moves CLOSED → OPEN → HALF_OPEN → CLOSED (or back to OPEN) exactly as
resilience4j's breaker does without its automatic-transition timer, but it owns no clock, no timer,
no lock and no I/O: every method takes the caller's `now` (monotonic seconds from a `Clock`), so a
test drives it with plain floats. Metrics and logs reach the outside only through the
`on_transition` callback and the `metrics()` snapshot; this module imports no grpc, redis,
onnxruntime or prometheus.

The rules are resilience4j's (CircuitBreakerStateMachine / CircuitBreakerMetrics, 2.x):

- a rate counts once the window holds `minimum_number_of_calls` outcomes (for a count window, at
  most its size); HALF_OPEN judges over min(`minimum_number_of_calls`,
  `permitted_calls_in_half_open`) outcomes, so it may re-open or close before every probe is back;
- a threshold is reached at `rate >= threshold`, for the slow-call rate too (100 means "open when
  every call is slow", not "off");
- a call is slow when its duration is strictly greater than `slow_call_duration_s`;
- OPEN moves to HALF_OPEN only strictly after `wait_duration_in_open_s`.

Deliberate differences (the README lists them):

- every permit carries the generation of the state that issued it, so a result that arrives after
  a transition (a slow call started while CLOSED, finishing after the breaker opened) is ignored
  instead of counting against the new state (resilience4j counts it against the new state);
- no automatic OPEN -> HALF_OPEN timer: the transition happens on the first call after the wait
  (resilience4j's default, automaticTransitionFromOpenToHalfOpenEnabled = false);
- defaults are chosen for model serving, not resilience4j's (see BreakerConfig).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

# The breaker's settings are a section of the settings (server/config/breaker.py).
from server.config.breaker import BreakerConfig as BreakerConfig


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    # Set only by an operator (force_open / disable); never entered on its own.
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


class TransitionReason(enum.StrEnum):
    """Why a transition happened: a small fixed set, safe as a metric label."""

    FAILURE_RATE = "failure_rate"
    SLOW_CALL_RATE = "slow_call_rate"
    WAIT_ELAPSED = "wait_elapsed"
    PROBES_SUCCEEDED = "probes_succeeded"
    HALF_OPEN_TIMEOUT = "half_open_timeout"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"
    RESET = "reset"


class Permit:
    """Leave to run one call, from `CircuitBreaker.allow`; hand it back to record or release.

    A plain slotted class, not a frozen dataclass: one is made per request, and a frozen
    dataclass's __init__ costs an object.__setattr__ per field."""

    __slots__ = ("generation", "serial")

    def __init__(self, generation: int, serial: int) -> None:
        self.generation = generation
        self.serial = serial

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Permit) and (self.generation, self.serial) == (
            other.generation,
            other.serial,
        )

    def __hash__(self) -> int:
        return hash((self.generation, self.serial))

    def __repr__(self) -> str:
        return f"Permit(generation={self.generation}, serial={self.serial})"


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change. Rates are those of the window being left (-1.0: too few calls)."""

    name: str
    from_state: BreakerState
    to_state: BreakerState
    at: float
    failure_rate: float
    slow_call_rate: float
    reason: TransitionReason


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot. Rates are percentages, -1.0 while fewer than the minimum calls are buffered
    (resilience4j's convention, so a gauge can always be set). `not_permitted_calls` counts every
    rejection since the breaker was made (a monotonic counter, not reset by transitions)."""

    state: BreakerState
    failure_rate: float
    slow_call_rate: float
    buffered_calls: int
    not_permitted_calls: int


_FAILED = 1
_SLOW = 2


class _CountWindow:
    """The last `size` outcomes in a ring, with running totals: O(1) per record."""

    __slots__ = ("_next", "_outcomes", "_size", "calls", "failures", "minimum", "slow")

    def __init__(self, size: int, minimum: int) -> None:
        self._size = size
        # Grown on demand up to `size`, so a large configured window costs nothing until used.
        self._outcomes: list[int] = []
        self._next = 0
        self.minimum = minimum
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def expire(self, second: int) -> None:
        pass

    def add(self, outcome: int, second: int) -> None:
        if len(self._outcomes) < self._size:
            self._outcomes.append(outcome)
        else:
            old = self._outcomes[self._next]
            self.calls -= 1
            self.failures -= old & _FAILED
            self.slow -= (old & _SLOW) >> 1
            self._outcomes[self._next] = outcome
        self._next = (self._next + 1) % self._size
        self.calls += 1
        self.failures += outcome & _FAILED
        self.slow += (outcome & _SLOW) >> 1


class _TimeWindow:
    """Outcomes of the last `seconds` whole seconds, one bucket per second in a ring.

    Moving the window clears one bucket per elapsed second (at most `seconds` of them), so a
    record costs O(1) amortised over time.
    """

    __slots__ = (
        "_calls",
        "_failures",
        "_head",
        "_size",
        "_slow",
        "calls",
        "failures",
        "minimum",
        "slow",
    )

    def __init__(self, seconds: int, minimum: int) -> None:
        self._size = seconds
        self._calls = [0] * seconds
        self._failures = [0] * seconds
        self._slow = [0] * seconds
        self._head: int | None = None  # the newest second the ring holds
        self.minimum = minimum
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def expire(self, second: int) -> None:
        if self._head is None:
            self._head = second
            return
        if second <= self._head:
            return
        for elapsed in range(self._head + 1, self._head + 1 + min(second - self._head, self._size)):
            i = elapsed % self._size
            self.calls -= self._calls[i]
            self.failures -= self._failures[i]
            self.slow -= self._slow[i]
            self._calls[i] = self._failures[i] = self._slow[i] = 0
        self._head = second

    def add(self, outcome: int, second: int) -> None:
        self.expire(second)
        assert self._head is not None
        # A result stamped a little earlier than the newest (measured before a later one was
        # recorded) lands in the newest bucket rather than in one already reused.
        i = self._head % self._size
        self._calls[i] += 1
        self._failures[i] += outcome & _FAILED
        self._slow[i] += (outcome & _SLOW) >> 1
        self.calls += 1
        self.failures += outcome & _FAILED
        self.slow += (outcome & _SLOW) >> 1


_Window = _CountWindow | _TimeWindow


def _rate(part: int, window: _Window) -> float:
    if window.calls == 0 or window.calls < window.minimum:
        return -1.0
    return 100.0 * part / window.calls


def _second(now: float) -> int:
    return math.floor(now)


class CircuitBreaker:
    """A circuit breaker for one dependency, driven by the caller's clock values.

    Guarantees:
    - `allow(now)` returns a Permit or None at once; it never blocks, sleeps or does I/O.
    - CLOSED admits every call. Once at least `minimum_number_of_calls` outcomes are in the window
      and the failure rate or the slow-call rate reaches its threshold, the breaker opens on that
      record.
    - OPEN (and FORCED_OPEN) admits nothing. The first `allow` strictly after
      `wait_duration_in_open_s` past the opening moves to HALF_OPEN (no timer: without traffic the
      state stays OPEN, like resilience4j without automatic transition).
    - HALF_OPEN never has more than `permitted_calls_in_half_open` permits admitted (issued and
      not released); once min(`minimum_number_of_calls`, that many) probes are recorded the
      breaker opens again if their rates reach a threshold and closes with an empty window
      otherwise (resilience4j's HalfOpenState). With
      `max_wait_in_half_open_s` > 0 it reopens once that long has passed without a verdict.
    - A permit recorded or released after the state that issued it has ended is ignored, and in
      HALF_OPEN a permit recorded or released twice counts once. Callers must record or release
      every permit exactly once; CLOSED does not track permits, so a repeat there counts twice.
    - `on_transition` runs exactly once per transition, after the new state is in place, so it may
      call back into the breaker; whatever it raises reaches the caller of the method that moved.

    Not thread-safe: use one breaker from one event loop (or under the caller's lock).
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config if config is not None else BreakerConfig()
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._serial = 0
        self._entered_at = -math.inf
        self._window: _Window = self._closed_window()
        # Half-open probes issued and neither recorded nor released yet.
        self._probes: set[int] = set()
        self._not_permitted = 0

    @property
    def state(self) -> BreakerState:
        """The state as of the last call into the breaker (transitions happen only inside one)."""
        return self._state

    def allow(self, now: float) -> Permit | None:
        """A permit to run one call now, or None when the breaker rejects it."""
        if self._state is BreakerState.CLOSED:  # the hot path: nothing can move
            self._serial += 1
            return Permit(self._generation, self._serial)
        cfg = self.config
        if self._state is BreakerState.OPEN:
            if now > self._entered_at + cfg.wait_duration_in_open_s:
                self._move(BreakerState.HALF_OPEN, now, TransitionReason.WAIT_ELAPSED)
        elif self._state is BreakerState.HALF_OPEN:
            self._check_half_open_deadline(now)

        state = self._state  # not CLOSED: no transition above leads there
        if state is BreakerState.DISABLED:
            return self._issue()
        if (
            state is BreakerState.HALF_OPEN
            # A recorded probe keeps its slot: the half-open verdict is over exactly N outcomes.
            and self._window.calls + len(self._probes) < cfg.permitted_calls_in_half_open
        ):
            permit = self._issue()
            self._probes.add(permit.serial)
            return permit
        self._not_permitted += 1
        return None

    def rejecting(self, now: float) -> bool:
        """True (and counted as not permitted) when a call now would be rejected outright:
        OPEN within its wait, or FORCED_OPEN. Takes no permit, so a caller can refuse work
        before queueing it; HALF_OPEN and CLOSED answer False (ask `allow`)."""
        state = self._state
        if state is BreakerState.FORCED_OPEN or (
            state is BreakerState.OPEN
            and now <= self._entered_at + self.config.wait_duration_in_open_s
        ):
            self._not_permitted += 1
            return True
        return False

    def record(self, permit: Permit, ok: bool, duration_s: float, now: float) -> None:
        """Count the outcome of a call admitted by `allow`; may move the state."""
        if self._state is BreakerState.CLOSED:  # the hot path, the same steps as below
            if permit.generation != self._generation:
                return
            outcome = (0 if ok else _FAILED) | (
                _SLOW if duration_s > self.config.slow_call_duration_s else 0
            )
            window = self._window
            window.add(outcome, _second(now))
            if window.calls >= window.minimum:
                self._judge(now)
            return
        if self._state is BreakerState.HALF_OPEN:
            self._check_half_open_deadline(now)
        if permit.generation != self._generation:
            return
        if self._state is BreakerState.HALF_OPEN:
            if permit.serial not in self._probes:
                return
            self._probes.discard(permit.serial)
        else:
            # CLOSED was handled above; DISABLED counts nothing (OPEN and FORCED_OPEN issue no
            # permits).
            return
        slow = duration_s > self.config.slow_call_duration_s
        outcome = (0 if ok else _FAILED) | (_SLOW if slow else 0)
        self._window.add(outcome, _second(now))
        self._judge(now)

    def release(self, permit: Permit, now: float) -> None:
        """Hand back a permit whose call never ran (cancelled, expired): it is not counted."""
        if self._state is BreakerState.HALF_OPEN:
            self._check_half_open_deadline(now)
        if self._state is BreakerState.HALF_OPEN and permit.generation == self._generation:
            self._probes.discard(permit.serial)

    def metrics(self, now: float) -> BreakerMetrics:
        """A snapshot of the current window; a time window first drops seconds that have passed."""
        if self._state is BreakerState.CLOSED:
            self._window.expire(_second(now))
        window = self._window
        return BreakerMetrics(
            state=self._state,
            failure_rate=_rate(window.failures, window),
            slow_call_rate=_rate(window.slow, window),
            buffered_calls=window.calls,
            not_permitted_calls=self._not_permitted,
        )

    def force_open(self, now: float) -> None:
        """Reject every call until `reset` or `disable` (an operator's switch)."""
        self._move(BreakerState.FORCED_OPEN, now, TransitionReason.FORCED_OPEN)

    def disable(self, now: float) -> None:
        """Admit every call and count nothing until `reset` or `force_open`."""
        self._move(BreakerState.DISABLED, now, TransitionReason.DISABLED)

    def reset(self, now: float) -> None:
        """Back to CLOSED with an empty window, whatever the state."""
        if self._state is BreakerState.CLOSED:
            self._generation += 1
            self._window = self._closed_window()
        else:
            self._move(BreakerState.CLOSED, now, TransitionReason.RESET)

    # ---- internals ------------------------------------------------------------------------

    def _closed_window(self) -> _Window:
        cfg = self.config
        if cfg.sliding_window_type == "time":
            return _TimeWindow(cfg.sliding_window_size, cfg.effective_minimum_calls)
        return _CountWindow(cfg.sliding_window_size, cfg.effective_minimum_calls)

    def _issue(self) -> Permit:
        self._serial += 1
        return Permit(self._generation, self._serial)

    def _check_half_open_deadline(self, now: float) -> None:
        limit = self.config.max_wait_in_half_open_s
        if limit > 0 and now >= self._entered_at + limit:
            self._move(BreakerState.OPEN, now, TransitionReason.HALF_OPEN_TIMEOUT)

    def _judge(self, now: float) -> None:
        cfg = self.config
        window = self._window
        if window.calls < window.minimum:
            return
        # Compared as integers scaled by 100 so "exactly at the threshold" is exact.
        if window.failures * 100 >= cfg.failure_rate_threshold * window.calls:
            self._move(BreakerState.OPEN, now, TransitionReason.FAILURE_RATE)
        elif window.slow * 100 >= cfg.slow_call_rate_threshold * window.calls:
            self._move(BreakerState.OPEN, now, TransitionReason.SLOW_CALL_RATE)
        elif self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED, now, TransitionReason.PROBES_SUCCEEDED)

    def _move(self, to: BreakerState, now: float, reason: TransitionReason) -> None:
        from_state = self._state
        if from_state is to:
            return
        left = self._window
        event = Transition(
            name=self.name,
            from_state=from_state,
            to_state=to,
            at=now,
            failure_rate=_rate(left.failures, left),
            slow_call_rate=_rate(left.slow, left),
            reason=reason,
        )
        self._state = to
        # Every permit issued before this point is now stale.
        self._generation += 1
        self._entered_at = now
        self._probes.clear()
        if to is BreakerState.HALF_OPEN:
            probes = self.config.permitted_calls_in_half_open
            self._window = _CountWindow(probes, min(self.config.minimum_number_of_calls, probes))
        elif to is BreakerState.CLOSED or to is BreakerState.DISABLED:
            self._window = self._closed_window()
        # OPEN and FORCED_OPEN keep the window that tripped, so metrics show why it opened.
        if self._on_transition is not None:
            self._on_transition(event)
