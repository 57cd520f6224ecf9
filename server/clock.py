"""Time, injected: monotonic seconds for intervals and deadlines."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...


class MonotonicClock:
    """The real clock (time.monotonic)."""

    __slots__ = ()

    # The builtin itself, not a method calling it: `clock.now()` is one C call on the hot path
    # (several per request).
    now = staticmethod(time.monotonic)


class FakeClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
