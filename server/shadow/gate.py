"""The promotion gate's judgement: its thresholds (`GateConfig`) and `evaluate_gate`, which
turns one report and an error count into promote, roll back or wait. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from server.shadow.compare import ShadowReport


@dataclass(frozen=True, slots=True)
class GateConfig:
    """When a shadow (or canary) may replace the primary: over at least `min_requests`
    requests, labels agree at least `min_agreement` of the time, scores differ by at most
    `max_mean_abs_diff` on average, and at most `max_error_rate` of its runs fail."""

    min_requests: int = 1000
    min_agreement: float = 0.99
    max_mean_abs_diff: float = 0.05
    max_error_rate: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int):
            raise ValueError(f"min_requests: expected an integer >= 1, got {self.min_requests!r}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests: expected an integer >= 1, got {self.min_requests!r}")
        for name in ("min_agreement", "max_error_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name}: expected a number in 0..1, got {value!r}")
        value = self.max_mean_abs_diff
        # inf is allowed (and documented): it turns the score check off for a model without
        # scores. NaN is refused (every comparison with it is false).
        if isinstance(value, bool) or not (isinstance(value, int | float) and value >= 0):
            raise ValueError(f"max_mean_abs_diff: expected a number >= 0 or inf, got {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateConfig:
        known = {"min_requests", "min_agreement", "max_mean_abs_diff", "max_error_rate"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown key")
        return cls(**data)


GateAction = Literal["promote", "rollback", "wait"]


@dataclass(frozen=True)
class GateDecision:
    """What the gate advises, why (one reason per check), and the numbers it decided on."""

    action: GateAction
    reasons: list[str]
    numbers: dict[str, float]

    def summary(self) -> str:
        """One log line: the action, its reasons and numbers."""
        numbers = ", ".join(f"{k}={v:.6g}" for k, v in self.numbers.items())
        return f"{self.action}: {'; '.join(self.reasons)} [{numbers}]"


def evaluate_gate(report: ShadowReport, errors: int, config: GateConfig) -> GateDecision:
    """Promote when every threshold holds over enough requests, roll back when one breaks,
    otherwise wait. `errors` counts the candidate's failed runs over the same window; the error
    rate is errors / (report.requests + errors). A threshold whose number was not measured
    (NaN: no labels, no scores) neither passes nor breaks: the gate waits. Set min_agreement
    to 0 (or max_mean_abs_diff to inf) to gate a model without labels (or scores)."""
    total = report.requests + errors
    error_rate = errors / total if total else math.nan
    numbers = {
        "requests": float(report.requests),
        "errors": float(errors),
        "error_rate": error_rate,
        "label_agreement": report.label_agreement,
        "mean_abs_diff": report.mean_abs_diff,
        "min_requests": float(config.min_requests),
        "min_agreement": config.min_agreement,
        "max_mean_abs_diff": config.max_mean_abs_diff,
        "max_error_rate": config.max_error_rate,
    }
    if total < config.min_requests:
        return GateDecision(
            "wait", [f"{total} of {config.min_requests} requests observed"], numbers
        )
    breaks: list[str] = []
    passes: list[str] = []
    unmeasured: list[str] = []
    if error_rate > config.max_error_rate:
        breaks.append(f"error rate {error_rate:.4f} > {config.max_error_rate:g}")
    else:
        passes.append(f"error rate {error_rate:.4f} <= {config.max_error_rate:g}")
    if config.min_agreement > 0:
        if math.isnan(report.label_agreement):
            unmeasured.append("label agreement not measured (no labels)")
        elif report.label_agreement < config.min_agreement:
            breaks.append(
                f"label agreement {report.label_agreement:.4f} < {config.min_agreement:g}"
            )
        else:
            passes.append(
                f"label agreement {report.label_agreement:.4f} >= {config.min_agreement:g}"
            )
    if math.isfinite(config.max_mean_abs_diff):
        if math.isnan(report.mean_abs_diff):
            unmeasured.append("score difference not measured (no scores)")
        elif report.mean_abs_diff > config.max_mean_abs_diff:
            breaks.append(
                f"mean |score diff| {report.mean_abs_diff:.4f} > {config.max_mean_abs_diff:g}"
            )
        else:
            passes.append(
                f"mean |score diff| {report.mean_abs_diff:.4f} <= {config.max_mean_abs_diff:g}"
            )
    if breaks:
        return GateDecision("rollback", breaks, numbers)
    if unmeasured:
        return GateDecision("wait", unmeasured, numbers)
    return GateDecision("promote", passes, numbers)
