"""The failover timeline (load.chart.timeline_html) rendered from synthetic samples."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

from load.chart import BOTTOM, FAULT, HEIGHT, LEFT, RIGHT, TOP, WIDTH, timeline_html
from load.scenario import Failover, Sample

SVG = "{http://www.w3.org/2000/svg}"
VOID = {"meta", "br", "img", "input", "link", "hr"}


def sample(t: float, token: int | None) -> Sample:
    return Sample(
        t=t,
        leader=None if token is None else f"n{token}",
        token=token,
        accepted=0,
        charged=0,
        queue_depth=0,
    )


def svg_of(page: str) -> ET.Element:
    """The chart as parsed XML (it must be well-formed to parse at all)."""
    start, end = page.index("<svg"), page.index("</svg>") + len("</svg>")
    return ET.fromstring(page[start:end])


class TagBalance(HTMLParser):
    """Fails on any closing tag that does not close the innermost open one."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        assert self.open[-1:] == [tag], f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()


def balanced(page: str) -> bool:
    parser = TagBalance()
    parser.feed(page)
    parser.close()
    return parser.open == []


RUN = timeline_html(
    "kill scenario",
    charged_per_second=[(0, 10), (1, 12), (2, 0), (3, 15)],
    samples=[sample(0.0, 5), sample(1.0, 5), sample(2.0, None), sample(2.5, 9), sample(3.5, 9)],
    failovers=[
        Failover("kill", at=1.5, old_token=5, seconds=0.84, new_token=9),
        Failover("etcd-member", at=3.0, old_token=9, seconds=None),
    ],
    summary={"payments": 37, "exactly_once": True},
    per_second=[(0, 0, 4.0), (1, 3, 40.0), (2, 7, 90.0), (3, 0, 5.0)],
)

TOKEN = "#2a7d2a"


def token_line(page: str) -> ET.Element:
    lines = [p for p in svg_of(page).findall(f"{SVG}polyline") if p.attrib["stroke"] == TOKEN]
    assert len(lines) == 1
    return lines[0]


def test_the_page_is_well_formed_html_around_a_well_formed_svg() -> None:
    assert RUN.startswith("<!doctype html>")
    assert balanced(RUN)
    assert svg_of(RUN).tag == f"{SVG}svg"


def test_each_second_is_one_bar_titled_with_its_count() -> None:
    bars = [r for r in svg_of(RUN).iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]

    assert [bar.findtext(f"{SVG}title") for bar in bars] == [
        "0s: 10 charged",
        "1s: 12 charged",
        "2s: 0 charged",
        "3s: 15 charged",
        "1s: 3 failed attempts",
        "2s: 7 failed attempts",
    ]


def test_ingest_p99_is_a_line_and_every_axis_is_labelled() -> None:
    svg = svg_of(RUN)
    p99 = [p for p in svg.findall(f"{SVG}polyline") if p.attrib["stroke"] == "#7a3fb0"]
    texts = [t.text or "" for t in svg.iter(f"{SVG}text")]

    assert len(p99) == 1
    assert len(p99[0].attrib["points"].split()) == 4
    assert "time since start (s)" in texts
    assert any(t.startswith("charged per second") for t in texts)
    assert any(t.startswith("client attempts failed") for t in texts)
    assert any(t.startswith("ingest p99") for t in texts)
    assert any(t.startswith("leader's fencing token") for t in texts)


def test_every_bar_stays_inside_the_plot() -> None:
    bars = [r for r in svg_of(RUN).iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]

    for bar in bars:
        left, width = float(bar.attrib["x"]), float(bar.attrib["width"])
        top, height = float(bar.attrib["y"]), float(bar.attrib["height"])
        assert left >= LEFT
        assert left + width <= WIDTH - RIGHT + 0.5
        assert top >= TOP - 0.5
        assert top + height <= HEIGHT - BOTTOM + 0.5


def test_each_fault_is_a_red_line_labelled_with_its_downtime() -> None:
    svg = svg_of(RUN)
    lines = [line for line in svg.findall(f"{SVG}line") if line.attrib["stroke"] == FAULT]
    labels = [t.text for t in svg.findall(f"{SVG}text") if t.attrib.get("fill") == FAULT]

    assert len(lines) == 2
    assert labels == ["kill (0.84s)", "etcd-member"]


def test_the_leader_token_is_one_step_line_skipping_leaderless_samples() -> None:
    points = token_line(RUN).attrib["points"].split()
    # four samples with a token: the first point, then a horizontal step + a point for each
    assert len(points) == 1 + 2 * 3
    heights = [float(p.split(",")[1]) for p in points]
    assert heights[-1] < heights[0]  # a higher token is drawn higher


def test_the_summary_is_a_table_row_per_entry() -> None:
    assert "<tr><th>payments</th><td>37</td></tr>" in RUN
    assert "<tr><th>exactly_once</th><td>True</td></tr>" in RUN


def test_no_input_still_renders_an_empty_chart() -> None:
    page = timeline_html("empty", [], [], [], {})
    svg = svg_of(page)

    assert balanced(page)
    assert svg.findall(f"{SVG}polyline") == []
    assert [line for line in svg.findall(f"{SVG}line") if line.attrib["stroke"] == FAULT] == []
    assert "<table></table>" in page
    assert not re.search(r"nan|inf", page, re.IGNORECASE)


def test_a_single_leader_token_draws_a_flat_line_without_dividing_by_zero() -> None:
    page = timeline_html("one leader", [(0, 1)], [sample(0, 3), sample(4, 3)], [], {})
    heights = {p.split(",")[1] for p in token_line(page).attrib["points"].split()}

    assert len(heights) == 1


def test_text_from_the_run_is_escaped() -> None:
    page = timeline_html(
        "<script>alert(1)</script>",
        [],
        [],
        [Failover("<b>kill</b>", at=0.0, old_token=None, seconds=None)],
        {"<k>": "a & b"},
    )

    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "&lt;b&gt;kill&lt;/b&gt;" in page
    assert "<tr><th>&lt;k&gt;</th><td>a &amp; b</td></tr>" in page
    assert balanced(page)
