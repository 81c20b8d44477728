"""Small, dependency-free SVG charts for the self-contained HTML report.

Three shapes cover what the report shows: horizontal bars (counts by label), a histogram, and
line series over steps. Each returns an `<svg>` string with a title and axis labels; text is
escaped, so labels taken from generated data cannot inject markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#3b6ea8", "#d9822b", "#4f9a55", "#b2453f", "#7a5ba6", "#8c6d46")


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        nice = step * 10**exponent
        if nice >= value:
            return nice
    return 10 ** (exponent + 1)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.0f}"
    return f"{value:.3g}"


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    width: int = 640,
    color: str = PALETTE[0],
) -> str:
    """Horizontal bars, one per label, largest first as given."""
    row, left, top = 22, 180, 34
    height = top + row * max(len(labels), 1) + 30
    scale_max = _nice_max(max(values, default=0))
    plot_width = width - left - 60
    parts = [
        f'<svg class="chart bar-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<title>{escape(title)}</title><text x="8" y="20" class="chart-title">{escape(title)}</text>',
    ]
    if not labels:
        parts.append(f'<text x="{left}" y="{top + 16}" class="empty">no data</text>')
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * row
        bar = max(1.0, plot_width * value / scale_max) if value > 0 else 0
        parts.append(
            f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" class="label">{escape(str(label)[:28])}</text>'
            f'<rect class="bar" x="{left}" y="{y + 3}" width="{bar:.1f}" height="{row - 6}" fill="{color}">'
            f"<title>{escape(str(label))}: {_fmt(value)}</title></rect>"
            f'<text x="{left + bar + 4:.1f}" y="{y + 15}" class="value">{_fmt(value)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def histogram(
    values: Sequence[float],
    *,
    title: str,
    x_label: str,
    bins: int = 20,
    range_: tuple[float, float] | None = None,
    width: int = 640,
    height: int = 240,
    color: str = PALETTE[0],
) -> str:
    """Counts of `values` in equal-width bins."""
    left, right, top, bottom = 50, 16, 34, 40
    lo, hi = range_ if range_ else (min(values, default=0.0), max(values, default=1.0))
    if hi <= lo:
        hi = lo + 1.0
    counts = [0] * bins
    for value in values:
        index = min(bins - 1, max(0, int((value - lo) / (hi - lo) * bins)))
        counts[index] += 1
    y_max = _nice_max(max(counts, default=0))
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / bins
    parts = [
        f'<svg class="chart histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<title>{escape(title)}</title><text x="8" y="20" class="chart-title">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="tick">{_fmt(y_max)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="tick">0</text>',
    ]
    for i, count in enumerate(counts):
        h = plot_h * count / y_max
        x = left + i * bar_w
        edge_lo, edge_hi = lo + (hi - lo) * i / bins, lo + (hi - lo) * (i + 1) / bins
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{color}"><title>{_fmt(edge_lo)}–{_fmt(edge_hi)}: {count}</title></rect>'
        )
    parts.append(
        f'<text x="{left}" y="{height - 20}" class="tick">{_fmt(lo)}</text>'
        f'<text x="{left + plot_w}" y="{height - 20}" text-anchor="end" class="tick">{_fmt(hi)}</text>'
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" class="label">{escape(x_label)}</text>'
        "</svg>"
    )
    return "".join(parts)


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 260,
) -> str:
    """One polyline per named series of (x, y) points, with a legend."""
    left, right, top, bottom = 60, 16, 34, 40
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    x_lo = min((p[0] for p in points), default=0.0)
    x_hi = max((p[0] for p in points), default=1.0)
    y_lo = min((p[1] for p in points), default=0.0)
    y_hi = max((p[1] for p in points), default=1.0)
    if x_hi <= x_lo:
        x_hi = x_lo + 1
    if y_hi <= y_lo:
        y_hi = y_lo + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def sy(y: float) -> float:
        return top + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))

    parts = [
        f'<svg class="chart line-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<title>{escape(title)}</title><text x="8" y="20" class="chart-title">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="tick">{_fmt(y_hi)}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="tick">{_fmt(y_lo)}</text>',
        f'<text x="{left}" y="{height - 20}" class="tick">{_fmt(x_lo)}</text>',
        f'<text x="{left + plot_w}" y="{height - 20}" text-anchor="end" class="tick">{_fmt(x_hi)}</text>',
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" class="label">{escape(x_label)}</text>',
        f'<text x="12" y="{top + plot_h / 2}" class="label" transform="rotate(-90 12 {top + plot_h / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>',
    ]
    drawn = {name: values for name, values in series.items() if values}
    for i, (name, values) in enumerate(drawn.items()):
        color = PALETTE[i % len(PALETTE)]
        finite = [(x, y) for x, y in values if math.isfinite(y)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
        if len(finite) == 1:
            x, y = finite[0]
            parts.append(
                f'<circle class="series" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>'
            )
        elif finite:
            parts.append(
                f'<polyline class="series" points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        parts.append(
            f'<rect x="{left + plot_w - 150}" y="{top + 4 + 16 * i}" width="10" height="10" fill="{color}"/>'
            f'<text x="{left + plot_w - 135}" y="{top + 13 + 16 * i}" class="legend">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
