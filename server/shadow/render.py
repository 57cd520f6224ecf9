"""How a shadow report reads: plain text for the terminal, and a self-contained HTML page
with an inline SVG histogram of score differences per shadow.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from server.shadow.compare import ShadowReport
from server.shadow.pairs import ShadowPair


def _fmt(value: float, scale: float = 1.0, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value * scale:.{digits}f}"


def render_text(reports: Sequence[ShadowReport], window_s: float | None) -> str:
    span = "the whole log" if window_s is None else f"the last {window_s:g} s"
    if not reports:
        return f"no shadow pairs in {span}\n"
    lines = [f"shadow comparison over {span}"]
    for r in reports:
        lines += [
            "",
            f"{r.model}: shadow version {r.shadow_version} vs {', '.join(r.primary_versions) or '-'}",
            f"  requests compared   {r.requests} ({r.rows} scored rows)",
            f"  label agreement     {_fmt(r.label_agreement)}",
            f"  |score diff|        mean {_fmt(r.mean_abs_diff)}  p99 {_fmt(r.p99_abs_diff)}",
            f"  score PSI           {_fmt(r.psi)}",
            f"  latency primary ms  p50 {_fmt(r.primary_latency_p50_s, 1e3, 3)}"
            f"  p99 {_fmt(r.primary_latency_p99_s, 1e3, 3)}",
            f"  latency shadow ms   p50 {_fmt(r.shadow_latency_p50_s, 1e3, 3)}"
            f"  p99 {_fmt(r.shadow_latency_p99_s, 1e3, 3)}",
            f"  shed (model)        {r.shed}",
            f"  shadow failures     {r.failures}",
        ]
    return "\n".join(lines) + "\n"


def _svg_histogram(diffs: npt.NDArray[np.float64], width: int = 480, height: int = 160) -> str:
    """An inline SVG histogram of signed score differences (shadow - primary)."""
    if diffs.size == 0:
        return "<p>no scored rows</p>"
    bound = float(np.max(np.abs(diffs))) or 1e-6
    counts, edges = np.histogram(diffs, bins=41, range=(-bound, bound))
    top = int(counts.max()) or 1
    bar = width / counts.size
    rects = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / top
        rects.append(
            f'<rect x="{i * bar:.1f}" y="{height - 20 - h:.1f}" width="{bar - 1:.1f}" '
            f'height="{h:.1f}" fill="#4a7ab5"><title>{edges[i]:.4g}..{edges[i + 1]:.4g}: '
            f"{int(c)}</title></rect>"
        )
    mid = width / 2
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="histogram of shadow minus primary scores">'
        + "".join(rects)
        + f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height - 20}" stroke="#999"/>'
        + f'<text x="0" y="{height - 5}" font-size="11">{-bound:.3g}</text>'
        + f'<text x="{mid - 4}" y="{height - 5}" font-size="11">0</text>'
        + f'<text x="{width - 40}" y="{height - 5}" font-size="11">{bound:.3g}</text>'
        + "</svg>"
    )


def render_html(
    reports: Sequence[ShadowReport], pairs: Sequence[ShadowPair], window_s: float | None
) -> str:
    """A self-contained page: the report table and, per shadow, a histogram of differences."""
    e = html.escape
    columns: list[tuple[str, Callable[[ShadowReport], str]]] = [
        ("model", lambda r: r.model),
        ("shadow", lambda r: r.shadow_version),
        ("vs", lambda r: ", ".join(r.primary_versions)),
        ("requests", lambda r: str(r.requests)),
        ("agreement", lambda r: _fmt(r.label_agreement)),
        ("mean |diff|", lambda r: _fmt(r.mean_abs_diff)),
        ("p99 |diff|", lambda r: _fmt(r.p99_abs_diff)),
        ("PSI", lambda r: _fmt(r.psi)),
        (
            "primary p50/p99 ms",
            lambda r: (
                f"{_fmt(r.primary_latency_p50_s, 1e3, 3)} / {_fmt(r.primary_latency_p99_s, 1e3, 3)}"
            ),
        ),
        (
            "shadow p50/p99 ms",
            lambda r: (
                f"{_fmt(r.shadow_latency_p50_s, 1e3, 3)} / {_fmt(r.shadow_latency_p99_s, 1e3, 3)}"
            ),
        ),
        ("shed", lambda r: str(r.shed)),
        ("failures", lambda r: str(r.failures)),
    ]
    head = "".join(f"<th>{e(name)}</th>" for name, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(get(r))}</td>" for _, get in columns) + "</tr>" for r in reports
    )
    charts = []
    for r in reports:
        diffs = np.fromiter(
            (
                s - p
                for pair in pairs
                if pair.model == r.model and pair.shadow_version == r.shadow_version
                for p, s in zip(pair.primary_scores, pair.shadow_scores, strict=True)
                if math.isfinite(p) and math.isfinite(s)
            ),
            dtype=np.float64,
        )
        charts.append(
            f"<h2>{e(r.model)} {e(r.shadow_version)}: shadow &minus; primary score</h2>"
            + _svg_histogram(diffs)
        )
    span = "the whole log" if window_s is None else f"the last {window_s:g} s"
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>batchline shadow report'
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Shadow comparison over {e(span)}</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + "".join(charts)
        + "</body></html>\n"
    )
