"""The failover timeline as one self-contained HTML file (inline SVG; nothing fetched).

Bars: payments charged per second. Step line: the leader's fencing token. Red lines: faults.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from load.scenario import Failover, Sample

WIDTH, HEIGHT, PAD = 900, 320, 48


def timeline_html(
    title: str,
    charged_per_second: Sequence[tuple[int, int]],
    samples: Sequence[Sample],
    failovers: Sequence[Failover],
    summary: dict[str, object],
) -> str:
    """Render the chart and a summary table."""
    # +1: the last per-second bar is one second wide and must stay inside the plot.
    span = max([s + 1 for s, _ in charged_per_second] + [s.t for s in samples] + [1.0])
    peak = max([n for _, n in charged_per_second] + [1])
    tokens = [s.token for s in samples if s.token is not None]
    low, high = (min(tokens), max(tokens)) if tokens else (0, 1)
    high = max(high, low + 1)
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def x(t: float) -> float:
        return PAD + plot_w * t / span

    def y_rate(n: float) -> float:
        return PAD + plot_h * (1 - n / peak)

    def y_token(tok: float) -> float:
        return PAD + plot_h * (1 - (tok - low) / (high - low) * 0.9 - 0.05)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect x="{PAD}" y="{PAD}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    bar_w = max(1.0, plot_w / max(span, 1) - 1)
    for second, n in charged_per_second:
        parts.append(
            f'<rect x="{x(second):.1f}" y="{y_rate(n):.1f}" width="{bar_w:.1f}" '
            f'height="{PAD + plot_h - y_rate(n):.1f}" fill="#7aa6d8">'
            f"<title>{second}s: {n} charged</title></rect>"
        )
    points: list[str] = []
    for sample in samples:
        if sample.token is None:
            continue
        if points:
            points.append(f"{x(sample.t):.1f},{points[-1].split(',')[1]}")
        points.append(f"{x(sample.t):.1f},{y_token(sample.token):.1f}")
    if points:
        parts.append(
            f'<polyline points="{" ".join(points)}" fill="none" stroke="#2a7d2a" stroke-width="2"/>'
        )
    for failover in failovers:
        fx = x(failover.at)
        label = failover.fault
        if failover.seconds is not None:
            label += f" ({failover.seconds:.2f}s)"
        parts.append(
            f'<line x1="{fx:.1f}" y1="{PAD}" x2="{fx:.1f}" y2="{PAD + plot_h}" '
            'stroke="#d33" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{fx + 3:.1f}" y="{PAD + 12}" fill="#d33">{html.escape(label)}</text>'
        )
    parts += [
        f'<text x="{PAD}" y="{PAD - 8}">charged/s (bars, peak {peak}) · leader token '
        f"(green, {low} to {high}) · faults (red)</text>",
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 12}" text-anchor="end">{span:.0f} s</text>',
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
