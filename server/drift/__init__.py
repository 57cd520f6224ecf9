"""Drift monitoring: the in-server producer streams predictions to the drift sidecar.

`DriftSettings` is the ``[drift]`` table of batchline.toml, shared by both ends: the server reads
``enabled``/``target``/``queue_size``/``chunk``/``sample_ratio``, the sidecar the rest. This
module stays import-light (no grpc, no scipy) so the server's config can use it.

    [drift]
    enabled = true
    target = "127.0.0.1:8011"
    sample_ratio = 1.0
    window_rows = 5000
    window_s = 600.0
    alerts = ["feature_psi > 0.25", "score_psi > 0.25", "accuracy < 0.7"]
    alert_cooldown_s = 600.0
    alert_webhook = "http://retrain.internal/hook"
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from typing import Any, Protocol

from server.errors import ConfigError

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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True)
class DriftSettings:
    """Producer (in the server) and sidecar settings; see the module docstring."""

    # Producer, in the inference server.
    enabled: bool = False
    target: str = "127.0.0.1:8011"
    queue_size: int = 10000
    chunk: int = 256
    sample_ratio: float = 1.0
    flush_timeout_s: float = 2.0
    backoff_max_s: float = 5.0
    # Sidecar (`batchline drift`).
    host: str = "0.0.0.0"
    grpc_port: int = 8011
    http_port: int = 8012
    registry: str = ""
    window_rows: int = 5000
    window_s: float = 600.0
    min_rows: int = 100
    eval_every_records: int = 1000
    eval_every_s: float = 10.0
    # The record-count trigger waits this long after a window's last evaluation, which bounds
    # evaluation work (~10 ms a window) whatever the traffic.
    eval_min_interval_s: float = 1.0
    max_windows: int = 64
    label_memory_rows: int = 100000
    label_window_rows: int = 5000
    alerts: tuple[str, ...] = ("feature_psi > 0.25", "score_psi > 0.25")
    alert_cooldown_s: float = 600.0
    alert_webhook: str = ""
    alert_command: str = ""
    ready_file: str = ""
    log_level: str = "info"

    def alert_rules(self) -> tuple[AlertRule, ...]:
        return tuple(AlertRule.parse(text) for text in self.alerts)


def check_settings(s: DriftSettings, prefix: str = "drift") -> None:
    """Raise ConfigError naming the first bad key."""

    def need(name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{prefix}.{name}: expected {expected}, got {getattr(s, name)!r}")

    for name in ("queue_size", "chunk", "window_rows", "max_windows", "label_window_rows"):
        need(name, getattr(s, name) >= 1, "an integer >= 1")
    for name in ("min_rows", "eval_every_records", "label_memory_rows"):
        need(name, getattr(s, name) >= 0, "an integer >= 0")
    need("sample_ratio", 0.0 <= s.sample_ratio <= 1.0, "a number in 0..1")
    for name in (
        "flush_timeout_s",
        "window_s",
        "eval_every_s",
        "eval_min_interval_s",
        "alert_cooldown_s",
    ):
        need(name, getattr(s, name) >= 0, "a number >= 0")
    need("backoff_max_s", s.backoff_max_s > 0, "a number > 0")
    for name in ("grpc_port", "http_port"):
        need(name, 0 <= getattr(s, name) <= 65535, "a port 0..65535")
    need("http_port", s.http_port != s.grpc_port or s.http_port == 0, "a port other than grpc_port")
    need("target", bool(s.target) or not s.enabled, "host:port of the drift sidecar")
    need(
        "log_level",
        s.log_level.lower() in ("debug", "info", "warning", "error"),
        "debug, info, warning or error",
    )
    for text in s.alerts:
        try:
            AlertRule.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{prefix}.alerts: {exc}") from None


class PredictionSink(Protocol):
    """Where the serving path hands each answered request (DriftProducer.record)."""

    def record(
        self,
        model: str,
        version: str,
        role: str,
        request_id: str,
        entity_id: str,
        features: Any,
        scores: Any,
        labels: Any = None,
        latency_s: float = 0.0,
    ) -> None: ...


# -- the sidecar's flags (here, not in sidecar.py, so building a CLI parser stays cheap) -------

_FLAGS: dict[str, tuple[str, type, str]] = {
    # flag: (settings field, type, help)
    "--registry": ("registry", str, "file registry folder holding the profile.json attachments"),
    "--host": ("host", str, "address to bind"),
    "--grpc-port": ("grpc_port", int, "DriftService port (0: any free)"),
    "--http-port": ("http_port", int, "metrics and report port (0: any free)"),
    "--window-rows": ("window_rows", int, "rows kept per model version and role"),
    "--window-s": ("window_s", float, "seconds of rows an evaluation looks at (0: no limit)"),
    "--min-rows": ("min_rows", int, "rows needed before a window is evaluated"),
    "--eval-every-records": ("eval_every_records", int, "evaluate after this many records"),
    "--eval-every-s": ("eval_every_s", float, "evaluate windows with news this often"),
    "--eval-min-interval-s": (
        "eval_min_interval_s",
        float,
        "least time between two record-triggered evaluations of a window",
    ),
    "--max-windows": ("max_windows", int, "windows kept at most"),
    "--label-memory-rows": ("label_memory_rows", int, "prediction rows kept for label joins"),
    "--label-window-rows": ("label_window_rows", int, "labelled rows in the rolling accuracy"),
    "--alert-cooldown-s": ("alert_cooldown_s", float, "seconds before a rule may fire again"),
    "--alert-webhook": ("alert_webhook", str, "URL to POST each alert to (JSON)"),
    "--alert-command": ("alert_command", str, "command to run per alert ($BATCHLINE_ALERT)"),
    "--ready-file": ("ready_file", str, "write the bound ports here as JSON once serving"),
    "--log-level": ("log_level", str, "debug, info, warning or error"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sidecar's flags; each overrides its key of the [drift] table."""
    for flag, (name, kind, text) in _FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, help=text)
    parser.add_argument(
        "--alert",
        dest="alerts",
        action="append",
        metavar="'METRIC > N'",
        help="alert rule, e.g. 'feature_psi > 0.25' (repeatable; replaces the configured rules)",
    )


def settings_from_args(
    args: argparse.Namespace, base: DriftSettings | None = None
) -> DriftSettings:
    """`base` (the [drift] table, or the defaults) with the flags given applied, checked."""
    changes: dict[str, Any] = {}
    for name, _kind, _text in _FLAGS.values():
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "alerts", None):
        changes["alerts"] = tuple(args.alerts)
    settings = replace(base or DriftSettings(), **changes)
    check_settings(settings)
    return settings


__all__ = [
    "ALERT_METRICS",
    "AlertRule",
    "DriftSettings",
    "PredictionSink",
    "add_arguments",
    "check_settings",
    "settings_from_args",
]
