"""`batchline shadow report`: read a pair log (optionally the last --window of it), compare
and print the reports as text or JSON, optionally an HTML page too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from server.shadow.compare import compare
from server.shadow.log import read_log
from server.shadow.render import render_html, render_text

_WINDOW = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_window(text: str) -> float:
    """'90s', '10m', '2h', '1d', '500ms' or plain seconds -> seconds."""
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise ValueError(f"--window: expected e.g. 30s, 10m, 2h or 1d, got {text!r}")
    number, unit = match.groups()
    return float(number) * _UNIT_S[unit or "s"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `batchline shadow report`; sets `func` to `run_report`."""
    parser.add_argument("--log", required=True, help="the JSON-lines shadow pair log")
    parser.add_argument(
        "--window", help="only pairs from the last 30s / 10m / 2h / 1d (default: the whole log)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--html", metavar="FILE", help="also write an HTML page with a chart")
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace, *, now_ns: Callable[[], int] = time.time_ns) -> int:
    try:
        window_s = parse_window(args.window) if args.window else None
    except ValueError as exc:
        print(f"batchline shadow report: {exc}", file=sys.stderr)
        return 2
    since = None if window_s is None else now_ns() - int(window_s * 1e9)
    try:
        contents = read_log(args.log, since)
    except OSError as exc:
        print(f"batchline shadow report: {exc}", file=sys.stderr)
        return 2
    reports = compare(contents.pairs, contents.shed, contents.failures)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "window_s": window_s,
                    "skipped_lines": contents.skipped_lines,
                    "reports": [r.to_dict() for r in reports],
                },
                indent=2,
            )
        )
    else:
        sys.stdout.write(render_text(reports, window_s))
        if contents.skipped_lines:
            print(f"({contents.skipped_lines} unreadable log lines skipped)")
    if args.html:
        Path(args.html).write_text(render_html(reports, contents.pairs, window_s), "utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`batchline shadow report` on its own: argv holds what follows `report`."""
    parser = argparse.ArgumentParser(
        prog="batchline shadow report",
        description="Compare shadow versions with the served ones from a pair log.",
    )
    configure_parser(parser)
    args = parser.parse_args(argv)
    return run_report(args)
