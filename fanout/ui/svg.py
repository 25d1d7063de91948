"""The dashboard's charts, drawn as inline SVG by the server: no script and
no network needed to show them (the report is one offline file).

Every string that came from a job (chunk ids, errors) is escaped with
:func:`markupsafe.escape`; colours are presentation attributes, not ``style``,
so the pages' Content-Security-Policy needs no inline styles for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

from fanout.ui.timeline import OUTCOMES, Throughput, Timeline

#: Bar colours by outcome (colour-blind safe: Okabe-Ito).
COLOURS = {
    "committed": "#009e73",
    "continued": "#56b4e9",
    "retried": "#e69f00",
    "timed out": "#cc79a7",
    "dead": "#d55e00",
    "running": "#0072b2",
}
WIDTH = 960
LEFT = 44  # room for the lane labels
RIGHT = 24  # room for the last time label
MAX_LANE_HEIGHT = 14
MAX_PLOT_HEIGHT = 480


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def nice_step(span: float, ticks: int = 8) -> float:
    """A round tick spacing (1, 2 or 5 times a power of ten) for ``span``."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * power:
            return float(m * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def _seconds_label(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.4g}h"
    if s >= 60:
        return f"{s / 60:.4g}m"
    return f"{s:.4g}s"


def _time_axis(span: float, y: float, scale: Callable[[float], float]) -> list[str]:
    step = nice_step(span)
    end = WIDTH - RIGHT
    parts = [f'<line x1="{LEFT}" y1="{_num(y)}" x2="{end}" y2="{_num(y)}" stroke="#999"/>']
    t = 0.0
    while t <= span + 1e-9:
        x = scale(t)
        parts.append(
            f'<line x1="{_num(x)}" y1="{_num(y)}" x2="{_num(x)}" y2="{_num(y + 4)}" stroke="#999"/>'
            f'<text x="{_num(x)}" y="{_num(y + 16)}" font-size="10" text-anchor="middle"'
            f' fill="#444">{_seconds_label(t)}</text>'
        )
        t += step
    return parts


def legend(outcomes: Sequence[str] = OUTCOMES) -> Markup:
    """A small SVG legend of the bar colours."""
    parts = []
    x = 0
    for outcome in outcomes:
        parts.append(
            f'<rect x="{x}" y="2" width="12" height="12" fill="{COLOURS[outcome]}"/>'
            f'<text x="{x + 16}" y="12" font-size="11" fill="#222">{escape(outcome)}</text>'
        )
        x += 24 + 7 * len(outcome)
    return Markup(
        f'<svg class="legend" width="{x}" height="16" role="img" aria-label="legend">'
        + "".join(parts)
        + "</svg>"
    )


def timeline_svg(tl: Timeline, chunk_href: Callable[[str], str] | None = None) -> Markup:
    """One lane per concurrency slot, one bar per attempt, coloured by outcome;
    each bar names its chunk, attempt and outcome on hover. With ``chunk_href``
    a bar that did not succeed links to its chunk's page (links on every bar
    of a 5,000-chunk run would add a third to the page)."""
    if not tl.bars:
        return Markup('<p class="empty">no attempts finished yet</p>')
    lane_h = max(1.0, min(MAX_LANE_HEIGHT, MAX_PLOT_HEIGHT / tl.lanes))
    plot_h = lane_h * tl.lanes
    span = max(tl.end - tl.start, 1e-3)
    width = WIDTH - LEFT - RIGHT

    def scale(t: float) -> float:
        return LEFT + t / span * width

    parts = [
        f'<svg class="timeline" viewBox="0 0 {WIDTH} {_num(plot_h + 24)}" width="{WIDTH}"'
        f' height="{_num(plot_h + 24)}" role="img" aria-label="timeline of chunk attempts">'
    ]
    if lane_h >= 8:
        for lane in range(tl.lanes):
            parts.append(
                f'<text x="{LEFT - 4}" y="{_num(lane * lane_h + lane_h * 0.75)}" font-size="9"'
                f' text-anchor="end" fill="#666">{lane + 1}</text>'
            )
    gap = 1.0 if lane_h >= 4 else 0.0
    for bar in tl.bars:
        x = scale(bar.start - tl.start)
        w = max(1.0, (bar.end - bar.start) / span * width)
        title = (
            f"chunk {bar.chunk_id} seq {bar.seq} attempt {bar.attempt}: {bar.outcome},"
            f" {bar.end - bar.start:.3f}s"
            + (f", {bar.records:,} records" if bar.records else "")
            + (f" - {bar.error}" if bar.error else "")
        )
        rect = (
            f'<rect class="bar" data-outcome="{escape(bar.outcome)}" x="{_num(x)}"'
            f' y="{_num(bar.lane * lane_h)}" width="{_num(w)}" height="{_num(lane_h - gap)}"'
            f' fill="{COLOURS[bar.outcome]}"><title>{escape(title)}</title></rect>'
        )
        if chunk_href is not None and bar.outcome not in ("committed", "continued"):
            rect = f'<a href="{escape(chunk_href(bar.chunk_id))}">{rect}</a>'
        parts.append(rect)
    parts.extend(_time_axis(span, plot_h + 2, scale))
    parts.append("</svg>")
    return Markup("".join(parts))


def rate_svg(values: Sequence[float], tp: Throughput, label: str, colour: str) -> Markup:
    """A bar chart of a rate over the run's time (one bar per bucket)."""
    if not values:
        return Markup(f'<p class="empty">no {escape(label)} yet</p>')
    height = 90.0
    top = max(values) or 1.0
    width = WIDTH - LEFT - RIGHT
    span = tp.width * len(values)
    bar_w = width / len(values)

    def scale(t: float) -> float:
        return LEFT + t / span * width

    parts = [
        f'<svg class="rate" viewBox="0 0 {WIDTH} {_num(height + 36)}" width="{WIDTH}"'
        f' height="{_num(height + 36)}" role="img" aria-label="{escape(label)}">',
        f'<text x="{LEFT}" y="10" font-size="11" fill="#222">{escape(label)}'
        f" (peak {top:,.1f})</text>",
    ]
    for i, v in enumerate(values):
        h = v / top * height
        parts.append(
            f'<rect x="{_num(LEFT + i * bar_w)}" y="{_num(14 + height - h)}"'
            f' width="{_num(max(bar_w - 1, 0.5))}" height="{_num(h)}" fill="{colour}">'
            f"<title>{_seconds_label(i * tp.width)}: {v:,.1f}</title></rect>"
        )
    parts.extend(_time_axis(span, 14 + height + 2, scale))
    parts.append("</svg>")
    return Markup("".join(parts))
