"""`[models.NAME.breaker]` and `[server.feature_breaker]`: one circuit breaker's settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from server.config.validation import SECTION, Float, Int, between, from_mapping, section

WindowType = Literal["count", "time"]

_Percent = Annotated[Float, between(0, 100, open_low=True, what="a percentage in (0, 100]")]
_Seconds = Annotated[Float, Field(ge=0, allow_inf_nan=False)]


@section()
@dataclass(frozen=True, slots=True, config=SECTION)
class BreakerConfig:
    """One breaker's settings, named and defaulted as resilience4j names them.

    Rates are percentages. A call is slow when its duration is greater than `slow_call_duration_s`.
    `sliding_window_size` counts calls for a "count" window and seconds for a "time" window.
    `slow_call_rate_threshold` = 100 (the default) opens only when every call in the window is
    slow. `max_wait_in_half_open_s` = 0 waits for the probes however long they take.
    Construction validates every field; the ConfigError (a ValueError) names it.

    Defaults and why they differ from resilience4j's (failure 50 %, slow 100 %, slow 60 s, window
    100 calls, minimum 100, wait 60 s, 10 probes, no half-open limit):
    `minimum_number_of_calls` 20 (a model server sees hundreds of calls a second; waiting for 100
    failures before shedding a broken model costs a burst of errors), `wait_duration_in_open_s`
    5 s (a model call is cheap to probe; a minute of fallbacks after a transient fault is long),
    `permitted_calls_in_half_open` 5 (half of 10: with 20 minimum calls, five probes decide), and
    `slow_call_duration_s` 60 s as resilience4j (slow-call shedding is opt-in by lowering it).
    """

    failure_rate_threshold: _Percent = 50.0
    slow_call_rate_threshold: _Percent = 100.0
    slow_call_duration_s: Annotated[Float, Field(gt=0, allow_inf_nan=False)] = 60.0
    sliding_window_type: WindowType = "count"
    sliding_window_size: Annotated[Int, Field(ge=1)] = 100
    minimum_number_of_calls: Annotated[Int, Field(ge=1)] = 20
    wait_duration_in_open_s: _Seconds = 5.0
    permitted_calls_in_half_open: Annotated[Int, Field(ge=1)] = 5
    max_wait_in_half_open_s: _Seconds = 0.0

    @classmethod
    def from_mapping(cls, prefix: str, mapping: Mapping[str, object]) -> BreakerConfig:
        """Build from a TOML table; the ConfigError names `prefix.key` for an unknown or bad key."""
        return from_mapping(cls, prefix, mapping)

    @property
    def effective_minimum_calls(self) -> int:
        """Calls needed before rates count; a count window can never hold more than its size.

        resilience4j clamps the same way, so a window of 10 with a minimum of 20 still opens.
        """
        if self.sliding_window_type == "count":
            return min(self.minimum_number_of_calls, self.sliding_window_size)
        return self.minimum_number_of_calls
