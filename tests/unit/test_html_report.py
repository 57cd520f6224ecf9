"""The shared report pieces: escaping, missing numbers, and SVG a real XML parser accepts."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from server.html_report import Cell, line, number, page, rect, svg, table, text

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    ("value", "digits", "scale", "shown"),
    [
        (math.nan, 3, 1.0, "-"),
        (0.12345, 3, 1.0, "0.123"),
        (0.0025, 3, 1e3, "2.500"),
        (-1.0, 0, 1.0, "-1"),
    ],
)
def test_number_shows_nan_as_a_dash(value: float, digits: int, scale: float, shown: str) -> None:
    assert number(value, digits, scale) == shown


def test_table_escapes_every_header_and_cell() -> None:
    markup = table(["<b>model</b>"], [["<script>x</script>"], [Cell("a&b", 'color:"red"')]])
    assert "<script>" not in markup
    assert "<b>" not in markup
    assert "&lt;script&gt;x&lt;/script&gt;" in markup
    assert '<td style="color:&quot;red&quot;">a&amp;b</td>' in markup


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.opened: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.opened.append(tag)


def test_page_is_one_document_with_the_escaped_title_and_the_body() -> None:
    doc = page("a <report>", ["<h1>hi</h1>", table(["x"], [["1"]])], css="td{color:red}")
    assert doc.startswith("<!doctype html>")
    assert "<title>a &lt;report&gt;</title>" in doc
    assert "td{color:red}" in doc
    parser = _Tags()
    parser.feed(doc)
    assert parser.opened[:5] == ["html", "head", "meta", "title", "style"]
    assert {"body", "h1", "table", "td"} <= set(parser.opened)


def test_svg_parts_are_well_formed_xml_with_the_given_geometry() -> None:
    image = svg(
        100,
        50,
        'scores "<0"',
        [
            rect(10, 20.04, 5, 30, "#4a7ab5", "0..1: 3 <rows>"),
            line(0, 50, 100, 50),
            text(0, 45, "a<b"),
        ],
    )
    root = ET.fromstring(image)  # an XML parser, not ours
    assert root.tag == f"{SVG}svg"
    assert (root.get("width"), root.get("height"), root.get("aria-label")) == (
        "100",
        "50",
        'scores "<0"',
    )
    bar = root.find(f"{SVG}rect")
    assert bar is not None
    assert [bar.get(k) for k in ("x", "y", "width", "height", "fill")] == [
        "10.0",
        "20.0",
        "5.0",
        "30.0",
        "#4a7ab5",
    ]
    title = bar.find(f"{SVG}title")
    assert title is not None
    assert title.text == "0..1: 3 <rows>"
    rule = root.find(f"{SVG}line")
    assert rule is not None
    assert [rule.get(k) for k in ("x1", "y1", "x2", "y2")] == [
        "0",
        "50",
        "100",
        "50",
    ]
    label = root.find(f"{SVG}text")
    assert label is not None
    assert label.text == "a<b"


def test_the_drift_page_built_on_them_holds_parseable_svg_and_the_coloured_level() -> None:
    from server._proto import drift_pb2 as pb
    from server.drift.report import render_html

    feature = pb.VariableDrift(
        name="f<1>", psi=0.3, level="act", ks_statistic=0.2, ks_pvalue=0.01, count=500,
        edges=[0.0, 1.0], reference_shares=[0.2, 0.5, 0.3], current_shares=[0.6, 0.3, 0.1],
    )  # fmt: skip
    window = pb.WindowReport(
        model="churn", version="1", role="primary", has_profile=True, features=[feature]
    )
    doc = render_html(pb.DriftReport(windows=[window], records_total=500))
    start = doc.index("<svg")
    image = ET.fromstring(doc[start : doc.index("</svg>", start) + len("</svg>")])
    bars = image.findall(f"{SVG}rect")
    assert len(bars) == 6  # three bins, reference and current each
    assert [b.get("fill") for b in bars[:2]] == ["#b0b0b0", "#c62828"]  # grey, then "act" red
    assert '<td style="color:#c62828">act</td>' in doc
    assert "f&lt;1&gt;" in doc
    assert "f<1>" not in doc
