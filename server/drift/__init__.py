"""Drift monitoring: the in-server producer streams predictions to the drift sidecar.

`DriftSettings` is the ``[drift]`` table of batchline.toml, shared by both ends: the server reads
``enabled``/``target``/``queue_size``/``max_queue_bytes``/``chunk``/``sample_ratio``/
``warn_after_s``, both read ``token``/``token_file`` (or BATCHLINE_DRIFT_TOKEN /
BATCHLINE_DRIFT_TOKEN_FILE), the sidecar the rest. This module stays import-light (no grpc, no
scipy) so the server's config can use it.

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

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from server.errors import ConfigError
from server.net import is_loopback

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
    # The queue is bounded in bytes too (ids, arrays, a fixed overhead per record): big records
    # cannot hold more memory than this, whatever queue_size says.
    max_queue_bytes: int = 64 * 1024 * 1024
    # A sidecar unreachable for longer than this is logged (WARNING, with the records dropped),
    # again at most every warn_after_s while it stays away, and its return at INFO.
    warn_after_s: float = 30.0
    # Both ends. A shared token: the producer sends it (metadata authorization: Bearer TOKEN),
    # the sidecar then refuses Record, PostLabels and refreshes without it. Prefer
    # BATCHLINE_DRIFT_TOKEN or token_file (BATCHLINE_DRIFT_TOKEN_FILE); never a flag (argv is
    # visible in /proc).
    token: str = ""
    token_file: str = ""
    # Sidecar (`batchline drift`). gRPC ingest on `host`, HTTP (metrics, report) on `http_host`
    # (empty: `host`). It shares the pod with the server: loopback unless told otherwise.
    host: str = "127.0.0.1"
    http_host: str = ""
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
    # ... and their bytes (request id, scores, labels, a fixed overhead per request).
    label_memory_bytes: int = 32 * 1024 * 1024
    label_window_rows: int = 5000
    alerts: tuple[str, ...] = ("feature_psi > 0.25", "score_psi > 0.25")
    alert_cooldown_s: float = 600.0
    alert_webhook: str = ""
    alert_command: str = ""
    ready_file: str = ""
    log_level: str = "info"

    def alert_rules(self) -> tuple[AlertRule, ...]:
        return tuple(AlertRule.parse(text) for text in self.alerts)

    def resolved_token(self) -> str:
        """The shared token: `token`, or the contents of `token_file` (stripped); "" for none."""
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as fh:
                return fh.read().strip()
        return self.token


# Environment variables for the [drift] keys both ends read (the token, never a flag).
ENV: dict[str, str] = {
    "BATCHLINE_DRIFT_TOKEN": "token",
    "BATCHLINE_DRIFT_TOKEN_FILE": "token_file",
}


def settings_from_env(base: DriftSettings, env: Mapping[str, str]) -> DriftSettings:
    """`base` with BATCHLINE_DRIFT_TOKEN / BATCHLINE_DRIFT_TOKEN_FILE applied (set and not
    empty). One replaces the other, so a token in the environment wins over a file in the
    config and the other way round."""
    changes: dict[str, Any] = {key: env[var] for var, key in ENV.items() if env.get(var)}
    if "token" in changes and "token_file" not in changes:
        changes["token_file"] = ""
    elif "token_file" in changes and "token" not in changes:
        changes["token"] = ""
    return replace(base, **changes) if changes else base


def check_settings(s: DriftSettings, prefix: str = "drift") -> None:
    """Raise ConfigError naming the first bad key."""

    def need(name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{prefix}.{name}: expected {expected}, got {getattr(s, name)!r}")

    for name in (
        "queue_size",
        "chunk",
        "window_rows",
        "max_windows",
        "label_window_rows",
        "max_queue_bytes",
        "label_memory_bytes",
    ):
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
    need("warn_after_s", s.warn_after_s > 0, "a number > 0")
    if s.token and s.token_file:
        raise ConfigError(f"{prefix}.token_file: give the drift token or its file, not both")
    if s.token_file:
        try:
            token = s.resolved_token()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                f"{prefix}.token_file: cannot read {s.token_file}: {reason}"
            ) from None
        if not token:
            raise ConfigError(f"{prefix}.token_file: {s.token_file} is empty")
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
    "--host": ("host", str, "address the gRPC ingest binds (default 127.0.0.1)"),
    "--http-host": (
        "http_host",
        str,
        "address the HTTP metrics and report bind (default: --host); 0.0.0.0 for a scraper",
    ),
    "--token-file": (
        "token_file",
        str,
        "file holding the shared token (or BATCHLINE_DRIFT_TOKEN; no token flag: argv is public)",
    ),
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
    "--label-memory-bytes": (
        "label_memory_bytes",
        int,
        "bytes the prediction rows kept for label joins may take",
    ),
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
    args: argparse.Namespace,
    base: DriftSettings | None = None,
    env: Mapping[str, str] | None = None,
) -> DriftSettings:
    """`base` (the [drift] table, or the defaults), then `env` (BATCHLINE_DRIFT_TOKEN...),
    then the flags given, checked."""
    base = settings_from_env(base or DriftSettings(), env or {})
    changes: dict[str, Any] = {}
    for name, _kind, _text in _FLAGS.values():
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "alerts", None):
        changes["alerts"] = tuple(args.alerts)
    if changes.get("token_file"):
        changes["token"] = ""  # --token-file replaces a token from the config or environment
    settings = replace(base, **changes)
    check_settings(settings)
    return settings


__all__ = [
    "ALERT_METRICS",
    "AlertRule",
    "DriftSettings",
    "PredictionSink",
    "add_arguments",
    "check_settings",
    "is_loopback",
    "settings_from_args",
    "settings_from_env",
]
