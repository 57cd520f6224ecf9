"""`[models.NAME.gate]`: when the promotion gate lets a shadow (or canary) replace the primary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field
from pydantic.dataclasses import dataclass

from server.config.validation import SECTION, Float, Int, between, from_mapping, section

_Share = Annotated[Float, between(0, 1, what="a number in 0..1")]


@section()
@dataclass(frozen=True, slots=True, config=SECTION)
class GateConfig:
    """When a shadow (or canary) may replace the primary: over at least `min_requests`
    requests, labels agree at least `min_agreement` of the time, scores differ by at most
    `max_mean_abs_diff` on average, and at most `max_error_rate` of its runs fail.
    `max_mean_abs_diff = inf` turns the score check off (a model without scores)."""

    min_requests: Annotated[Int, Field(ge=1)] = 1000
    min_agreement: _Share = 0.99
    max_mean_abs_diff: Annotated[Float, Field(ge=0)] = 0.05
    max_error_rate: _Share = 0.01

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        return from_mapping(cls, "", data)
