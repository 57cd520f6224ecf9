"""How a shadow report reads: plain text for the terminal, and a self-contained HTML page
with an inline SVG histogram of score differences per shadow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from server.html_report import escape, line, number, page, rect, svg, table, text
from server.shadow.compare import ShadowReport
from server.shadow.pairs import ShadowPair

_CSS = "body{margin:2em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"


def _fmt(value: float, scale: float = 1.0, digits: int = 4) -> str:
    return number(value, digits, scale)


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
    plot_h = height - 20
    parts = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        title = f"{edges[i]:.4g}..{edges[i + 1]:.4g}: {int(c)}"
        parts.append(rect(i * bar, plot_h - h, bar - 1, h, "#4a7ab5", title))
    mid = width / 2
    parts += [
        line(mid, 0, mid, plot_h),
        text(0, height - 5, f"{-bound:.3g}"),
        text(mid - 4, height - 5, "0"),
        text(width - 40, height - 5, f"{bound:.3g}"),
    ]
    return svg(width, height, "histogram of shadow minus primary scores", parts)


def render_html(
    reports: Sequence[ShadowReport], pairs: Sequence[ShadowPair], window_s: float | None
) -> str:
    """A self-contained page: the report table and, per shadow, a histogram of differences."""
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
    span = "the whole log" if window_s is None else f"the last {window_s:g} s"
    body = [
        f"<h1>Shadow comparison over {escape(span)}</h1>",
        table([name for name, _ in columns], ([get(r) for _, get in columns] for r in reports)),
    ]
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
        body.append(
            f"<h2>{escape(r.model)} {escape(r.shadow_version)}: shadow &minus; primary score</h2>"
            + _svg_histogram(diffs)
        )
    return page("batchline shadow report", body, _CSS)
