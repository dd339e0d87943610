"""The failover timeline as one self-contained HTML file (inline SVG; nothing fetched).

Four panels on one shared time axis, so a fault can be followed down the page: payments
charged per second (bars) with the queue depth (line); attempts clients saw fail per
second; ingest p99 per second; the leader's fencing token (step line). Every fault is a red
dashed line through all panels, labelled once at the top. Each panel has a labelled y axis
with ticks; the time axis at the bottom has ticks in seconds.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from load.scenario import Failover, Sample

WIDTH = 960
LEFT, RIGHT, TOP, BOTTOM = 64, 64, 40, 36  # margins: axis labels left/right, faults on top
PANEL_H, GAP = 110, 22
PANELS = 4
HEIGHT = TOP + PANELS * PANEL_H + (PANELS - 1) * GAP + BOTTOM
PAD = LEFT  # the plot's left edge (kept for callers that knew the old single panel)
FAULT = "#d33"


def nice_ticks(high: float, count: int = 4) -> list[float]:
    """Round tick values from 0 to at least ``high`` (about ``count`` of them)."""
    if high <= 0 or not math.isfinite(high):
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = [0.0]
    while ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:g}"


@dataclass
class _Panel:
    """One horizontal band of the chart and its value → y mapping."""

    index: int
    label: str
    top_value: float
    bottom_value: float = 0.0

    @property
    def top(self) -> float:
        return TOP + self.index * (PANEL_H + GAP)

    @property
    def bottom(self) -> float:
        return self.top + PANEL_H

    def y(self, value: float) -> float:
        span = (self.top_value - self.bottom_value) or 1.0
        return self.bottom - PANEL_H * (value - self.bottom_value) / span


def _frame(panel: _Panel, ticks: Sequence[float], plot_w: float, color: str) -> list[str]:
    parts = [
        f'<rect x="{LEFT}" y="{panel.top}" width="{plot_w}" height="{PANEL_H}" fill="#fafafa" '
        'stroke="#ccc"/>',
        f'<text x="{LEFT}" y="{panel.top - 6}" fill="{color}" font-weight="bold">'
        f"{html.escape(panel.label)}</text>",
    ]
    for tick in ticks:
        ty = panel.y(tick)
        parts.append(
            f'<line x1="{LEFT - 4}" y1="{ty:.1f}" x2="{LEFT + plot_w}" y2="{ty:.1f}" '
            'stroke="#e6e6e6"/>'
        )
        parts.append(f'<text x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    return parts


def _step_line(points: Sequence[tuple[float, float]], color: str) -> str:
    """A step polyline through (x, y) points: horizontal, then vertical at each change."""
    coords: list[str] = []
    for i, (px, py) in enumerate(points):
        if i:
            coords.append(f"{px:.1f},{points[i - 1][1]:.1f}")
        coords.append(f"{px:.1f},{py:.1f}")
    return f'<polyline points="{" ".join(coords)}" fill="none" stroke="{color}" stroke-width="2"/>'


def timeline_html(
    title: str,
    charged_per_second: Sequence[tuple[int, int]],
    samples: Sequence[Sample],
    failovers: Sequence[Failover],
    summary: dict[str, object],
    per_second: Sequence[tuple[int, int, float]] = (),
) -> str:
    """Render the four panels and a summary table.

    ``per_second`` holds (second, client errors, ingest p99 ms) for every second of the run.
    """
    span = max(
        [s + 1 for s, _ in charged_per_second]
        + [s.t for s in samples]
        + [s + 1 for s, _, _ in per_second]
        + [f.at for f in failovers]
        + [1.0]
    )
    plot_w = WIDTH - LEFT - RIGHT

    def x(t: float) -> float:
        return LEFT + plot_w * t / span

    bar_w = max(1.0, plot_w / span - 1)

    charged_ticks = nice_ticks(max([n for _, n in charged_per_second] + [1]))
    depth_peak = max([s.queue_depth for s in samples] + [1])
    depth_ticks = nice_ticks(depth_peak)
    error_ticks = nice_ticks(max([e for _, e, _ in per_second] + [1]))
    p99_ticks = nice_ticks(max([p for _, _, p in per_second] + [1.0]))
    tokens = [s.token for s in samples if s.token is not None]
    low, high = (min(tokens), max(tokens)) if tokens else (0, 1)
    if high == low:
        low, high = low - 1, high + 1

    charged = _Panel(
        0, "charged per second (bars) · queue depth (line, right axis)", charged_ticks[-1]
    )
    depth = _Panel(0, "", depth_ticks[-1])
    errors = _Panel(
        1, "client attempts failed per second (transport error or 5xx)", error_ticks[-1]
    )
    p99 = _Panel(2, "ingest p99 per second (ms)", p99_ticks[-1])
    token = _Panel(3, "leader's fencing token", high + 0.1 * (high - low), low - 0.1 * (high - low))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="11">',
    ]
    parts += _frame(charged, charged_ticks, plot_w, "#3b6fb0")
    for tick in depth_ticks:  # the queue's own axis, on the right
        parts.append(
            f'<text x="{LEFT + plot_w + 6}" y="{depth.y(tick) + 4:.1f}" fill="#b07a1f">'
            f"{_fmt(tick)}</text>"
        )
    parts += _frame(errors, error_ticks, plot_w, "#c0504d")
    parts += _frame(p99, p99_ticks, plot_w, "#7a3fb0")
    parts += _frame(token, [], plot_w, "#2a7d2a")
    for tok in sorted(set(tokens)):
        parts.append(
            f'<text x="{LEFT - 6}" y="{token.y(tok) + 4:.1f}" text-anchor="end">{tok}</text>'
        )

    def bars(
        panel: _Panel, series: Sequence[tuple[int, float]], fill: str, unit: str, *, zero: bool
    ) -> None:
        for second, value in series:
            if value < 0 or (value == 0 and not zero):
                continue
            parts.append(
                f'<rect x="{x(second):.1f}" y="{panel.y(value):.1f}" width="{bar_w:.1f}" '
                f'height="{panel.bottom - panel.y(value):.1f}" fill="{fill}">'
                f"<title>{second}s: {_fmt(round(value, 1))} {unit}</title></rect>"
            )

    bars(charged, [(s, float(n)) for s, n in charged_per_second], "#7aa6d8", "charged", zero=True)
    bars(
        errors, [(s, float(e)) for s, e, _ in per_second], "#e08080", "failed attempts", zero=False
    )
    depth_points = [(x(s.t), depth.y(s.queue_depth)) for s in samples]
    if depth_points:
        parts.append(_step_line(depth_points, "#d8a03a"))
    p99_points = [(x(s + 0.5), p99.y(p)) for s, _, p in per_second if p > 0]
    if p99_points:
        coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in p99_points)
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="#7a3fb0" stroke-width="1.5"/>'
        )
    token_points = [(x(s.t), token.y(s.token)) for s in samples if s.token is not None]
    if token_points:
        parts.append(_step_line(token_points, "#2a7d2a"))

    bottom = token.bottom
    for failover in failovers:
        fx = x(failover.at)
        label = failover.fault
        if failover.seconds is not None:
            label += f" ({failover.seconds:.2f}s)"
        parts.append(
            f'<line x1="{fx:.1f}" y1="{TOP - 14}" x2="{fx:.1f}" y2="{bottom}" '
            f'stroke="{FAULT}" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{fx + 3:.1f}" y="{TOP - 18}" fill="{FAULT}">{html.escape(label)}</text>'
        )
    for tick in nice_ticks(span, 10):
        if tick > span:
            break
        tx = x(tick)
        parts.append(
            f'<line x1="{tx:.1f}" y1="{bottom}" x2="{tx:.1f}" y2="{bottom + 4}" stroke="#666"/>'
        )
        parts.append(
            f'<text x="{tx:.1f}" y="{bottom + 16}" text-anchor="middle">{_fmt(tick)}</text>'
        )
    parts += [
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle">'
        "time since start (s)</text>",
        "</svg>",
    ]
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in summary.items()
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        "</title><style>body{font-family:sans-serif;margin:2em}th{text-align:left;"
        "padding-right:1em}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(parts)}<table>{rows}</table>"
        "</body></html>"
    )
