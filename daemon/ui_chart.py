"""The status page's pictures, as inline SVG: a tag's stacked status bar and its
delivery curve. Pure functions: numbers in, markup out (:mod:`daemon.ui` places them).

SVG sizes and positions are attributes, not ``style``: the pages' Content-Security-Policy
allows no inline style attribute, and colours come from the page's stylesheet by class.

The delivery curve plots, against time since sending, the share of a tag's numbers that
had reached a final status (any outcome) and the share delivered. Its input is what
:func:`daemon.queries.resolution_minutes` groups in SQL: per minute after sending, how
many numbers became final and how many of them were delivered. Reports mostly arrive
within a minute and then trickle in for up to 48 hours, so the time axis is
logarithmic (1 minute to the end), with labelled ticks in minutes and hours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

#: The statuses of a bar, left to right.
STATUS_ORDER = ("delivered", "not_delivered", "failed", "waiting", "unknown", "expired")
#: A bar's width in its own units (its viewBox); it is stretched to the cell.
_BAR_UNITS = 1000
#: The least width of a status present, so one failure among 100,000 still shows.
_SLIVER = 4

#: Labelled moments of the time axis, in minutes after sending.
TICKS = (
    (1, "1 min"),
    (2, "2 min"),
    (5, "5 min"),
    (15, "15 min"),
    (30, "30 min"),
    (60, "1 h"),
    (120, "2 h"),
    (360, "6 h"),
    (720, "12 h"),
    (1440, "24 h"),
    (2880, "48 h"),
)
#: The ticks still labelled on a phone (the axis' end is too).
_MAJOR = frozenset({1, 5, 15, 60, 360, 2880})
#: Where the table under the chart reads the curve.
MILESTONES = (1, 5, 15, 60, 360, 1440, 2880)
#: The axis reaches at least this far, so a new tag's first minutes do not fill it.
_MIN_AXIS = 15
# The chart's geometry, in its own units.
_W, _H = 880, 350
_LEFT, _RIGHT, _TOP, _BOTTOM = 92, 28, 44, 72
#: The least distance between two tick labels (a 2-minute tick on a 48-hour axis is
#: 68 units from the 1-minute one).
_LABEL_GAP = 64


def status_bar(counts: Mapping[str, int], total: int, *, big: bool = False) -> str:
    """A stacked bar of a tag's statuses, one ``<rect>`` per status present.

    Each segment carries ``data-status`` and ``data-count``, and the bar a ``<title>``
    (a tooltip, and its text for screen readers).
    """
    present = [(s, int(counts.get(s) or 0)) for s in STATUS_ORDER]
    present = [(s, n) for s, n in present if n > 0]
    whole = max(total, sum(n for _, n in present))
    label = (
        ", ".join(f"{s.replace('_', ' ')} {n:,}" for s, n in present) if present else "no numbers"
    )
    css = "bar big" if big else "bar"
    head = (
        f'<svg class="{css}" viewBox="0 0 {_BAR_UNITS} 10" preserveAspectRatio="none" '
        f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
    )
    if whole <= 0:
        return head + "</svg>"
    widths = [max(n / whole * _BAR_UNITS, _SLIVER) for _, n in present]
    scale = _BAR_UNITS / sum(widths) if sum(widths) > _BAR_UNITS else 1.0
    x, rects = 0.0, []
    for (status, n), width in zip(present, widths, strict=True):
        w = width * scale
        rects.append(
            f'<rect class="s-{status}" data-status="{status}" data-count="{n}" '
            f'x="{x:.2f}" y="0" width="{w:.2f}" height="10"/>'
        )
        x += w
    return head + "".join(rects) + "</svg>"


@dataclass(frozen=True)
class Curve:
    """A tag's delivery curve, cumulative.

    Attributes:
        total: the tag's numbers (the 100 % of both shares).
        points: ``(minute, final, delivered)``: the shares reached by ``minute`` after
            sending, one point per minute in which something became final, rising.
        end: the last minute the data speaks for (the last poll, or now).
    """

    total: int
    points: tuple[tuple[float, float, float], ...]
    end: float

    @property
    def axis_end(self) -> float:
        """The time axis' last minute: the next labelled tick past :attr:`end`."""
        for minutes, _ in TICKS:
            if minutes >= max(self.end, _MIN_AXIS):
                return float(minutes)
        return max(self.end, float(TICKS[-1][0]))

    def at(self, minute: float) -> tuple[float, float]:
        """The shares (final, delivered) reached by ``minute`` after sending."""
        reached = (0.0, 0.0)
        for t, final, delivered in self.points:
            if t > minute:
                break
            reached = (final, delivered)
        return reached


def build_curve(rows: Sequence[tuple[int, int, int]], total: int, *, observed: float) -> Curve:
    """The curve of the per-minute counts of :func:`daemon.queries.resolution_minutes`.

    Args:
        rows: ``(minute, final, delivered)``, numbers that became final during that
            minute after sending (minute 0: the first minute), by minute.
        total: the tag's numbers.
        observed: minutes from sending to the last poll (or now): how far the data goes.
    """
    if total <= 0:
        return Curve(0, (), max(observed, 1.0))
    final = delivered = 0
    points: list[tuple[float, float, float]] = []
    for minute, became_final, became_delivered in sorted(rows):
        final += became_final
        delivered += became_delivered
        # Became final during minute m: reached by the end of it, m + 1 minutes in.
        points.append((float(minute + 1), min(final / total, 1.0), min(delivered / total, 1.0)))
    last = points[-1][0] if points else 1.0
    return Curve(total, tuple(points), max(observed, last, 1.0))


def _x(minute: float, axis_end: float) -> float:
    """Horizontal position of ``minute`` on the log axis from 1 minute to ``axis_end``."""
    share = math.log(max(minute, 1.0)) / math.log(axis_end)
    return _LEFT + (_W - _LEFT - _RIGHT) * min(share, 1.0)


def _y(share: float) -> float:
    return _TOP + (_H - _TOP - _BOTTOM) * (1.0 - share)


def _steps(curve: Curve, which: int) -> list[str]:
    """Path commands of a step line through one share of the points, to the end."""
    end = curve.axis_end
    first = curve.at(1.0)[which]
    commands = [f"M{_x(1.0, end):.1f} {_y(first):.1f}"]
    for t, *shares in curve.points:
        if t <= 1.0:
            continue
        commands.append(f"H{_x(t, end):.1f} V{_y(shares[which]):.1f}")
    commands.append(f"H{_x(min(curve.end, end), end):.1f}")
    return commands


def _axes(axis_end: float) -> list[str]:
    """Grid, ticks and axis titles."""
    parts = []
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = _y(share)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text x="{_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{int(share * 100)} %</text>'
        )
    bottom = _H - _BOTTOM
    last_x = -100.0
    for minutes, label in TICKS:
        if minutes > axis_end:
            break
        x = _x(minutes, axis_end)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{bottom}"/>')
        if x - last_x >= _LABEL_GAP:
            # A phone's stylesheet enlarges the text and hides the minor labels.
            kind = "tick" if minutes in _MAJOR or minutes == axis_end else "tick minor"
            parts.append(
                f'<text class="{kind}" x="{x:.1f}" y="{bottom + 8}" text-anchor="middle">'
                f"{label}</text>"
            )
            last_x = x
    parts.append(
        f'<line class="axis" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{bottom}" y2="{bottom}"/>'
    )
    parts.append(f'<line class="axis" x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{bottom}"/>')
    parts.append(
        f'<text x="{(_LEFT + _W - _RIGHT) / 2:.0f}" y="{_H - 8}" text-anchor="middle">'
        "time since sending (log scale)</text>"
    )
    parts.append(f'<text class="ytitle" x="{_LEFT}" y="{_TOP - 14}">share of numbers</text>')
    return parts


def curve_svg(curve: Curve) -> str:
    """The delivery curve as an inline SVG chart, with a table of milestones under it."""
    if curve.total <= 0:
        return '<p class="muted curve-empty">No numbers under this tag yet.</p>'
    end = curve.axis_end
    final, delivered = curve.at(curve.end)
    title = (
        f"Delivery curve: {final:.1%} of {curve.total:,} numbers final and {delivered:.1%} "
        f"delivered after {_minutes(curve.end)}"
    )
    steps_final, steps_delivered = _steps(curve, 0), _steps(curve, 1)
    baseline = _y(0.0)
    area = " ".join(steps_delivered) + f" V{baseline:.1f} H{_x(1.0, end):.1f} Z"
    # The legend is HTML, so that it wraps on a phone rather than overflow the chart.
    legend = (
        '<div class="legend curve-legend">'
        f'<span><i class="k-final"></i>final (any outcome) <b>{final:.1%}</b></span>'
        f'<span><i class="k-delivered"></i>delivered <b>{delivered:.1%}</b></span>'
        f"<span>after {_minutes(curve.end)}</span></div>"
    )
    x_end = _x(min(curve.end, end), end)
    dots = (
        f'<circle class="d-final" cx="{x_end:.1f}" cy="{_y(final):.1f}" r="4"/>'
        f'<circle class="d-delivered" cx="{x_end:.1f}" cy="{_y(delivered):.1f}" r="4"/>'
    )
    svg = (
        f'<svg class="curve" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}" '
        f'data-final="{final:.4f}" data-delivered="{delivered:.4f}" data-end="{curve.end:.0f}">'
        f"<title>{escape(title)}</title>"
        + "".join(_axes(end))
        + f'<path class="a-delivered" d="{area}"/>'
        f'<path class="l-final" d="{" ".join(steps_final)}"/>'
        f'<path class="l-delivered" d="{" ".join(steps_delivered)}"/>' + dots + "</svg>"
    )
    return f'{legend}<div class="chart">{svg}</div>{_milestones(curve)}'


def _minutes(minutes: float) -> str:
    """A number of minutes as the axis labels say it."""
    if minutes < 60:
        return f"{minutes:.0f} min"
    if minutes <= 48 * 60:
        hours = minutes / 60
        return f"{hours:.0f} h" if hours == int(hours) else f"{hours:.1f} h"
    return f"{minutes / 1440:.1f} d"


def _milestones(curve: Curve) -> str:
    """The curve read at fixed moments, as a table (also what a screen reader gets)."""
    cells = []
    for minute in MILESTONES:
        if minute >= curve.end:
            break  # the last row reads the curve's end
        final, delivered = curve.at(minute)
        cells.append(
            f'<tr><td data-label="After">{_minutes(minute)}</td>'
            f'<td class="num" data-label="Final">{final:.1%}</td>'
            f'<td class="num" data-label="Delivered">{delivered:.1%}</td></tr>'
        )
    final, delivered = curve.at(curve.end)
    cells.append(
        f'<tr><td data-label="After">{_minutes(curve.end)} (last poll)</td>'
        f'<td class="num" data-label="Final">{final:.1%}</td>'
        f'<td class="num" data-label="Delivered">{delivered:.1%}</td></tr>'
    )
    return (
        '<table class="milestones"><thead><tr><th>After sending</th>'
        '<th class="num">Final</th><th class="num">Delivered</th></tr></thead>'
        f"<tbody>{''.join(cells)}</tbody></table>"
    )
