"""`[drift]`: the drift producer in the server and the sidecar process (server/drift).

Shared by both ends: the server reads `enabled`/`target`/`queue_size`/`max_queue_bytes`/
`chunk`/`sample_ratio`/`warn_after_s`, both read `token`/`token_file` (or BATCHLINE_DRIFT_TOKEN /
BATCHLINE_DRIFT_TOKEN_FILE), the sidecar the rest.

    [drift]
    enabled = true
    target = "127.0.0.1:8011"
    token_file = "/run/secrets/drift-token"   # or BATCHLINE_DRIFT_TOKEN; both ends read it
    sample_ratio = 1.0
    window_rows = 5000
    window_s = 600.0
    alerts = ["feature_psi > 0.25", "score_psi > 0.25", "accuracy < 0.7"]
    alert_cooldown_s = 600.0
    alert_webhook = "http://retrain.internal/hook"
"""

from __future__ import annotations

import re
from dataclasses import dataclass as plain_dataclass
from typing import Annotated, Self

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from server.config.validation import (
    SECTION,
    Bool,
    Float,
    Int,
    Port,
    Problems,
    Str,
    between,
    section,
)

# Metric -> the direction that is bad. feature_* metrics are evaluated per feature.
ALERT_METRICS: dict[str, str] = {
    "feature_psi": ">",
    "feature_js": ">",
    "feature_ks": ">",
    "feature_ks_pvalue": "<",
    "missing_rate": ">",
    "out_of_range_rate": ">",
    "score_psi": ">",
    "score_js": ">",
    "score_ks": ">",
    "accuracy": "<",
    "auc": "<",
}
_RULE = re.compile(r"\s*([a-z_]+)\s*([<>])\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*")
_LOG_LEVELS = ("debug", "info", "warning", "error")


@plain_dataclass(frozen=True, slots=True)
class AlertRule:
    """One threshold: ``metric > value`` (or ``<`` for accuracy, AUC and p-values)."""

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> AlertRule:
        match = _RULE.fullmatch(text)
        if match is None:
            raise ValueError(f"expected 'METRIC > NUMBER' or 'METRIC < NUMBER', got {text!r}")
        metric, op, value = match.groups()
        if metric not in ALERT_METRICS:
            raise ValueError(f"unknown metric {metric!r} (known: {', '.join(ALERT_METRICS)})")
        return cls(metric, op, float(value))

    def breached(self, value: float) -> bool:
        """NaN (nothing measured) never breaches."""
        return value > self.threshold if self.op == ">" else value < self.threshold

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


_Count = Annotated[Int, Field(ge=1)]
_Rows = Annotated[Int, Field(ge=0)]
_Seconds = Annotated[Float, Field(ge=0)]


@section("drift")
@dataclass(frozen=True, config=SECTION)
class DriftSettings:
    """Producer (in the server) and sidecar settings; see the module docstring. Construction
    checks every field (and that a token file is readable); the ConfigError names the key."""

    # Producer, in the inference server.
    enabled: Bool = False
    target: Str = "127.0.0.1:8011"
    queue_size: _Count = 10000
    chunk: _Count = 256
    sample_ratio: Annotated[Float, between(0, 1, what="a number in 0..1")] = 1.0
    flush_timeout_s: _Seconds = 2.0
    backoff_max_s: Annotated[Float, Field(gt=0)] = 5.0
    # The queue is bounded in bytes too (ids, arrays, a fixed overhead per record): big records
    # cannot hold more memory than this, whatever queue_size says.
    max_queue_bytes: _Count = 64 * 1024 * 1024
    # A sidecar unreachable for longer than this is logged (WARNING, with the records dropped),
    # again at most every warn_after_s while it stays away, and its return at INFO.
    warn_after_s: Annotated[Float, Field(gt=0)] = 30.0
    # Both ends. A shared token: the producer sends it (metadata authorization: Bearer TOKEN),
    # the sidecar then refuses Record, PostLabels and refreshes without it. Prefer
    # BATCHLINE_DRIFT_TOKEN or token_file (BATCHLINE_DRIFT_TOKEN_FILE); never a flag (argv is
    # visible in /proc).
    token: Str = ""
    token_file: Str = ""
    # Sidecar (`batchline drift`). gRPC ingest on `host`, HTTP (metrics, report) on `http_host`
    # (empty: `host`). It shares the pod with the server: loopback unless told otherwise.
    host: Str = "127.0.0.1"
    http_host: Str = ""
    grpc_port: Port = 8011
    http_port: Port = 8012
    registry: Str = ""
    window_rows: _Count = 5000
    window_s: _Seconds = 600.0
    min_rows: _Rows = 100
    eval_every_records: _Rows = 1000
    eval_every_s: _Seconds = 10.0
    # The record-count trigger waits this long after a window's last evaluation, which bounds
    # evaluation work (~10 ms a window) whatever the traffic.
    eval_min_interval_s: _Seconds = 1.0
    max_windows: _Count = 64
    label_memory_rows: _Rows = 100000
    # ... and their bytes (request id, scores, labels, a fixed overhead per request).
    label_memory_bytes: _Count = 32 * 1024 * 1024
    label_window_rows: _Count = 5000
    alerts: tuple[Str, ...] = ("feature_psi > 0.25", "score_psi > 0.25")
    alert_cooldown_s: _Seconds = 600.0
    alert_webhook: Str = ""
    alert_command: Str = ""
    ready_file: Str = ""
    log_level: Str = "info"

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems = Problems()
        if self.http_port == self.grpc_port and self.http_port != 0:
            problems.add("http_port", f"expected a port other than grpc_port, got {self.http_port}")
        if self.enabled and not self.target:
            problems.add("target", f"expected host:port of the drift sidecar, got {self.target!r}")
        if self.log_level.lower() not in _LOG_LEVELS:
            problems.add(
                "log_level", f"expected debug, info, warning or error, got {self.log_level!r}"
            )
        for text in self.alerts:
            try:
                AlertRule.parse(text)
            except ValueError as exc:
                problems.add("alerts", str(exc))
        if self.token and self.token_file:
            problems.add("token_file", "give the drift token or its file, not both")
        elif self.token_file:
            try:
                token = self.resolved_token()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                problems.add("token_file", f"cannot read {self.token_file}: {reason}")
            else:
                if not token:
                    problems.add("token_file", f"{self.token_file} is empty")
        problems.check()
        return self

    def alert_rules(self) -> tuple[AlertRule, ...]:
        return tuple(AlertRule.parse(text) for text in self.alerts)

    def resolved_token(self) -> str:
        """The shared token: `token`, or the contents of `token_file` (stripped); "" for none."""
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as fh:
                return fh.read().strip()
        return self.token
