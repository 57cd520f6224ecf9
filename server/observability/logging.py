"""Logging: JSON lines (one object per line with time, level, logger and message) for machines,
or plain text lines for a person at a terminal. `format="auto"` picks text when stderr is a
terminal and JSON otherwise (containers, files, log shippers)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("model", "version", "request_id", "trace_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`2026-12-02 14:01:50.123 INFO  server.app: message [model=churn version=1]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s",
                         datefmt="%Y-%m-%d %H:%M:%S")  # fmt: skip

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [
            f"{key}={value}"
            for key in ("model", "version", "request_id", "trace_id")
            if (value := getattr(record, key, None)) is not None
        ]
        if extra:
            # Before any traceback the base class appended.
            first, sep, rest = line.partition("\n")
            line = f"{first} [{' '.join(extra)}]{sep}{rest}"
        return line


LOG_FORMATS = ("auto", "text", "json")


def configure(level: str = "info", format: str = "auto") -> None:
    if format not in LOG_FORMATS:
        raise ValueError(f"log format: expected one of {', '.join(LOG_FORMATS)}, got {format!r}")
    if format == "auto":
        format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if format == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
