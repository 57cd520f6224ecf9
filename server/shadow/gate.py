"""The promotion gate's judgement: its thresholds (`GateConfig`, a section of the settings:
server/config/gate.py) and `evaluate_gate`, which
turns one report and an error count into promote, roll back or wait. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from server.config.gate import GateConfig as GateConfig
from server.shadow.compare import ShadowReport

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
