"""The pieces a self-contained report page is drawn with: the page, a table, inline SVG.

The shadow report (server/shadow/render.py) and the drift report (server/drift/report.py) both
build on these, so both pages escape the same way, print a missing number the same way and need
no plotting library or outside asset. A leaf: the standard library only.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

escape = html.escape

_BASE_CSS = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"


def number(value: float, digits: int = 3, scale: float = 1.0) -> str:
    """`value * scale` with `digits` decimals; "-" for NaN (nothing to show)."""
    return "-" if math.isnan(value) else f"{value * scale:.{digits}f}"


def page(title: str, body: Iterable[str], css: str = "") -> str:
    """A whole HTML document: `body` is markup (escape what it quotes), `css` adds to the base."""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_BASE_CSS}{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


@dataclass(frozen=True, slots=True)
class Cell:
    """A table cell with its own inline style (a colour, say)."""

    text: str
    style: str = ""


def table(header: Sequence[str], rows: Iterable[Sequence[str | Cell]]) -> str:
    """A table of text: every header and cell is escaped here."""
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, Cell):
                style = f' style="{escape(cell.style)}"' if cell.style else ""
                cells.append(f"<td{style}>{escape(cell.text)}</td>")
            else:
                cells.append(f"<td>{escape(cell)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    return "".join(lines)


def svg(width: float, height: float, label: str, parts: Iterable[str]) -> str:
    """An inline SVG image of `parts` (from rect, line, text), described by `label`."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}" '
        f'role="img" aria-label="{escape(label)}">' + "".join(parts) + "</svg>"
    )


def rect(x: float, y: float, width: float, height: float, fill: str, title: str) -> str:
    """A bar whose tooltip is `title`."""
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" '
        f'fill="{escape(fill)}"><title>{escape(title)}</title></rect>'
    )


def line(x1: float, y1: float, x2: float, y2: float, stroke: str = "#999") -> str:
    return f'<line x1="{x1:g}" y1="{y1:g}" x2="{x2:g}" y2="{y2:g}" stroke="{escape(stroke)}"/>'


def text(x: float, y: float, content: str, *, size: int = 11, fill: str = "#333") -> str:
    return (
        f'<text x="{x:g}" y="{y:g}" font-size="{size}" fill="{escape(fill)}">'
        f"{escape(content)}</text>"
    )
