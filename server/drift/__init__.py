"""Drift monitoring: the in-server producer streams predictions to the drift sidecar.

`DriftSettings` is the ``[drift]`` table of batchline.toml, shared by both ends; it is a section
of the settings (server/config/drift.py, with the alert rules it names). This module keeps the
sidecar's flags, so building a CLI parser stays cheap (no grpc, no scipy).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from server.config import load_settings
from server.config.drift import ALERT_METRICS, AlertRule, DriftSettings
from server.net import is_loopback


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
    """`base` (the [drift] table as load_settings read it), or else the defaults with `env`
    applied (BATCHLINE_DRIFT__*, BATCHLINE_DRIFT_TOKEN...), then the flags given, checked."""
    if base is None:
        base = load_settings(env=env or {}).drift
    changes: dict[str, Any] = {}
    for name, _kind, _text in _FLAGS.values():
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "alerts", None):
        changes["alerts"] = tuple(args.alerts)
    if changes.get("token_file"):
        changes["token"] = ""  # --token-file replaces a token from the config or environment
    return replace(base, **changes) if changes else base


__all__ = [
    "ALERT_METRICS",
    "AlertRule",
    "DriftSettings",
    "PredictionSink",
    "add_arguments",
    "is_loopback",
    "settings_from_args",
]
