"""The drift report: as a dict (JSON), as terminal text, as an HTML page with inline SVG
histograms (reference vs current, no plotting library), and the `batchline drift report` client.

All renderings read the same `DriftReport` message (proto/drift.proto), so the JSON keys are the
proto field names wherever the report is read: `/report.json`, `--format json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from server._proto import drift_pb2 as pb
from server.html_report import Cell, escape, line, number, page, rect, svg, table, text

_LEVEL_COLOURS = {
    "stable": "#2e7d32",
    "investigate": "#ef6c00",
    "act": "#c62828",
    "empty": "#757575",
}


def report_to_dict(message: Any) -> dict[str, Any]:
    """Every field by its proto name, defaults included; NaN becomes None (valid JSON)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        repeated = field.is_repeated
        if field.message_type is not None:
            if repeated:
                out[field.name] = [report_to_dict(v) for v in value]
            elif message.HasField(field.name):
                out[field.name] = report_to_dict(value)
            else:
                out[field.name] = None
        elif repeated:
            out[field.name] = [_plain(v) for v in value]
        else:
            out[field.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(value: float, digits: int = 3) -> str:
    return number(value, digits)


def _when(unix_s: float) -> str:
    if not unix_s:
        return "never"
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _window_title(w: pb.WindowReport) -> str:
    return f"{w.model}:{w.version} ({w.role})"


def format_text(report: pb.DriftReport) -> str:
    """A terminal table per window: the score first, then each feature."""
    lines = [
        f"drift report {_when(report.generated_unix_s)}: {report.records_total} records, "
        f"{report.rejected_total} rejected, {report.alerts_fired_total} alerts fired"
    ]
    if not report.windows:
        lines.append("(no predictions received yet)")
    for w in report.windows:
        lines.append("")
        lines.append(
            f"{_window_title(w)}  records {w.records_total}  rows {w.rows_total}  "
            f"window {w.window_rows} rows  evaluated {_when(w.evaluated_unix_s)}"
        )
        if not w.has_profile:
            lines.append("  no reference profile for this version: nothing to compare")
            continue
        if w.labelled_rows:
            lines.append(
                f"  labelled rows {w.labelled_rows}  accuracy {_num(w.accuracy)}  auc {_num(w.auc)}"
            )
        if w.active_alerts:
            lines.append(f"  ALERTS: {', '.join(w.active_alerts)}")
        variables = ([w.score] if w.HasField("score") else []) + list(w.features)
        if not variables:
            lines.append("  not evaluated yet (fewer rows than min_rows)")
            continue
        header = (
            f"  {'variable':<12} {'psi':>7} {'level':<11} {'ks':>6} {'ks_p':>8} "
            f"{'js':>6} {'missing':>7} {'out_rng':>7} {'n':>7}"
        )
        lines.append(header)
        for v in variables:
            lines.append(
                f"  {v.name:<12} {_num(v.psi, 4):>7} {v.level:<11} {_num(v.ks_statistic):>6} "
                f"{_num(v.ks_pvalue, 4):>8} {_num(v.js_distance):>6} {_num(v.missing_rate):>7} "
                f"{_num(v.out_of_range_rate):>7} {v.count:>7}"
            )
    return "\n".join(lines) + "\n"


def histogram_svg(v: pb.VariableDrift, width: int = 300, height: int = 110) -> str:
    """Reference (grey) vs current (coloured) bin shares, one pair of bars per bin."""
    ref = list(v.reference_shares)
    cur = list(v.current_shares) or [0.0] * len(ref)
    bins = max(1, len(ref))
    top = max([*ref, *cur, 1e-9])
    plot_h = height - 22
    slot = (width - 10) / bins
    colour = _LEVEL_COLOURS.get(v.level, "#1565c0")
    parts = [line(5, plot_h, width - 5, plot_h)]
    edges = list(v.edges)
    for i in range(bins):
        low = "-inf" if i == 0 else f"{edges[i - 1]:.3g}"
        high = "+inf" if i == len(edges) else f"{edges[i]:.3g}"
        x = 5 + i * slot
        for j, (share, fill) in enumerate(((ref[i], "#b0b0b0"), (cur[i], colour))):
            h = plot_h * share / top
            title = f"({low}, {high}] {'current' if j else 'reference'} {share:.3f}"
            parts.append(rect(x + slot * (0.1 + 0.4 * j), plot_h - h, slot * 0.4, h, fill, title))
    parts.append(text(5, height - 6, f"{v.name} psi {number(v.psi, 3)} ({v.level})"))
    return svg(width, height, f"{v.name} histogram", parts)


_CSS = (
    "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
    "td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:8px}"
    ".alert{color:#c62828;font-weight:bold}"
)
_COLUMNS = ("variable", "PSI", "level", "KS", "KS p", "JS", "missing", "out of range", "n")


def render_html(report: pb.DriftReport) -> str:
    """The /report page: a section per window, metrics table and a histogram per variable."""
    body = [
        "<h1>batchline drift report</h1>",
        f"<p>{_when(report.generated_unix_s)} &middot; {report.records_total} records &middot; "
        f"{report.rejected_total} rejected &middot; {report.alerts_fired_total} alerts fired. "
        "PSI &lt; 0.10 stable, 0.10&ndash;0.25 investigate, &gt; 0.25 act. "
        "Grey: reference, colour: current.</p>",
    ]
    if not report.windows:
        body.append("<p>No predictions received yet.</p>")
    for w in report.windows:
        body.append(f"<h2>{escape(_window_title(w))}</h2>")
        body.append(
            f"<p>records {w.records_total}, rows {w.rows_total}, window {w.window_rows} rows, "
            f"evaluated {_when(w.evaluated_unix_s)}"
            + (
                f"; labelled {w.labelled_rows}, accuracy {_num(w.accuracy)}, auc {_num(w.auc)}"
                if w.labelled_rows
                else ""
            )
            + "</p>"
        )
        if w.active_alerts:
            alerts = ", ".join(escape(a) for a in w.active_alerts)
            body.append(f"<p class='alert'>Active alerts: {alerts}</p>")
        if not w.has_profile:
            body.append("<p>No reference profile for this version.</p>")
            continue
        variables = ([w.score] if w.HasField("score") else []) + list(w.features)
        if not variables:
            body.append("<p>Not evaluated yet (fewer rows than min_rows).</p>")
            continue
        rows = [
            [
                v.name,
                _num(v.psi, 4),
                Cell(v.level, f"color:{_LEVEL_COLOURS.get(v.level, '#000')}"),
                _num(v.ks_statistic),
                _num(v.ks_pvalue, 4),
                _num(v.js_distance),
                _num(v.missing_rate),
                _num(v.out_of_range_rate),
                str(v.count),
            ]
            for v in variables
        ]
        body.append(table(_COLUMNS, rows))
        body.append("<div class='grid'>" + "".join(histogram_svg(v) for v in variables) + "</div>")
    return page("batchline drift report", body, _CSS)


# -- the client ------------------------------------------------------------------------------


def fetch_report(
    address: str,
    *,
    model: str = "",
    version: str = "",
    refresh: bool = True,
    timeout: float = 10.0,
    token: str = "",
) -> pb.DriftReport:
    """Ask a sidecar for its report (raises grpc.RpcError when it cannot). A sidecar with a
    token refuses a refresh without it (UNAUTHENTICATED)."""
    import grpc

    from server._proto import drift_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DriftServiceStub(channel)
        reply: pb.DriftReport = stub.Report(
            pb.ReportRequest(model=model, version=version, refresh=refresh),
            timeout=timeout,
            metadata=metadata,
        )
    return reply


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:8011", help="the sidecar's gRPC address")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--model", default="", help="only this model")
    parser.add_argument("--version", default="", help="only this version")
    parser.add_argument(
        "--no-refresh", action="store_true", help="the last evaluation, without evaluating now"
    )
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument(
        "--token-file",
        dest="report_token_file",
        metavar="FILE",
        help="file holding the sidecar's token (default: $BATCHLINE_DRIFT_TOKEN, "
        "$BATCHLINE_DRIFT_TOKEN_FILE)",
    )


def _token(args: argparse.Namespace) -> str:
    path = getattr(args, "report_token_file", None) or os.environ.get(
        "BATCHLINE_DRIFT_TOKEN_FILE", ""
    )
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return os.environ.get("BATCHLINE_DRIFT_TOKEN", "")


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 1 when the sidecar cannot be reached."""
    import grpc

    try:
        token = _token(args)
    except OSError as exc:
        print(f"batchline drift report: --token-file: cannot read it: {exc}", file=sys.stderr)
        return 2
    try:
        report = fetch_report(
            args.address,
            model=args.model,
            version=args.version,
            refresh=not args.no_refresh,
            timeout=args.timeout,
            token=token,
        )
    except grpc.RpcError as exc:
        print(f"batchline drift report: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(report_to_dict(report), indent=2))
    else:
        sys.stdout.write(format_text(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchline drift report", description="Print a drift sidecar's report."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
