"""The status page of ``run``'s HTTP server, as HTML: data in, one string out.

:mod:`daemon.statuspage` reads the aggregates (:mod:`daemon.queries`), :mod:`daemon.http`
the daemon's health, and they hand them here; nothing in this module does I/O, so the
pages are tested and benchmarked without a server. Two pages and a 404:

- ``GET /``: the daemon (owner, uptime, heartbeat, readiness and why, polls of the last
  hour by outcome, the auth pause, the next tag due) and every tag, newest send first,
  :data:`PAGE_SIZE` a page, each with a stacked bar of its statuses, its delivery rate,
  opt-outs and last poll;
- ``GET /ui/tags/{tag}``: one tag, its delivery curve (:mod:`daemon.ui_chart`) and its
  recent polls.

Everything shown is an aggregate: no phone number reaches a page, and error texts have
digit runs that could be one masked (:func:`mask_numbers`). Every value is escaped with
:func:`html.escape`. The pages load nothing from elsewhere (no script, font or
stylesheet; the favicon is an empty ``data:`` URL), so they work offline and under the
strict :data:`CONTENT_SECURITY_POLICY`: the one stylesheet (:mod:`daemon.ui_style`) is
inline and allowed by its hash, and the bars and the chart are inline SVG, whose sizes
are attributes, not styles.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape
from typing import Any
from urllib.parse import quote

from daemon.ui_chart import STATUS_ORDER, Curve, curve_svg, status_bar
from daemon.ui_style import CONTENT_SECURITY_POLICY as CONTENT_SECURITY_POLICY
from daemon.ui_style import CONTENT_TYPE as CONTENT_TYPE
from daemon.ui_style import CSS
from daemon.ui_style import PAGE_HEADERS as PAGE_HEADERS

#: Tags per page of ``GET /``.
PAGE_SIZE = 100
#: Polls shown on a tag's page.
HISTORY_SIZE = 50
#: Seconds between two automatic reloads of a page (a ``<meta>`` refresh, no script).
REFRESH_SECONDS = 60
#: Characters of an error text shown; the rest is cut.
_MAX_ERROR_CHARS = 300

#: What each status is called on the pages.
STATUS_LABELS = {
    "delivered": "delivered",
    "not_delivered": "not delivered",
    "failed": "failed",
    "waiting": "waiting",
    "unknown": "unknown",
    "expired": "expired",
}


#: A run of 8 or more digits (single spaces or dots between them allowed), with an
#: optional ``+``: what a phone number in an error text would look like.
_DIGIT_RUN = re.compile(r"\+?\d(?:[ .]?\d){7,}")


@dataclass(frozen=True)
class DaemonView:
    """What ``GET /`` says about the daemon (all read by :mod:`daemon.http`).

    Attributes:
        now: the time of the page.
        owner: this process's name in leases (host:pid:random), if known.
        started_at: when the HTTP server started (the uptime counts from it).
        last_beat: the scheduler loop's last heartbeat.
        problems: why the daemon is not ready (empty: ready).
        auth_error: the API key problem that pauses polling, if any.
        polls: polls started in the last hour, by outcome.
        polls_capped: the count stopped at the scan's limit (so "at least").
        next_due: the tag polled next and when (None: due now), or None.
        states: tracked tags per state.
    """

    now: datetime
    owner: str | None
    started_at: datetime | None
    last_beat: datetime | None
    problems: Sequence[str]
    auth_error: str | None
    polls: Mapping[str, int]
    polls_capped: bool = False
    next_due: tuple[str, datetime | None] | None = None
    states: Mapping[str, int] = field(default_factory=dict)


# --- small formatters ------------------------------------------------------------------------


def mask_numbers(text: str) -> str:
    """``text`` with anything that could be a phone number replaced by ``…``."""
    return _DIGIT_RUN.sub("…", text)


def duration(delta: timedelta) -> str:
    """A short human duration: ``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 4 h``."""
    seconds = int(abs(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def relative(now: datetime, when: datetime | None, *, never: str = "never") -> str:
    """``when`` as seen from ``now``: ``3 min ago``, ``in 40 s``, ``now``."""
    if when is None:
        return never
    delta = when - now
    if abs(delta) < timedelta(seconds=1):
        return "now"
    return f"in {duration(delta)}" if delta > timedelta(0) else f"{duration(delta)} ago"


def _time(when: datetime | None, *, seconds: bool = False) -> str:
    """A UTC time for people, in a ``<time>`` element carrying the exact ISO value."""
    if when is None:
        return "—"
    shown = when.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    return f'<time datetime="{escape(when.isoformat())}">{shown}</time>'


def _percent(part: int, whole: int) -> str:
    return "—" if whole <= 0 else f"{100 * part / whole:.1f} %"


def tag_href(tag: str) -> str:
    """The path of a tag's page (the tag percent-encoded, ``/`` included)."""
    return "/ui/tags/" + quote(tag, safe="")


def _badge(kind: str, text: str) -> str:
    return f'<span class="badge {escape(kind)}">{escape(text)}</span>'


def _outcome_badge(outcome: str | None) -> str:
    if outcome is None:
        return '<span class="muted">no poll yet</span>'
    return _badge(f"o-{outcome}", outcome.replace("_", " "))


def _error(text: object) -> str:
    """An error text, masked, cut and escaped (empty when there is none)."""
    if not isinstance(text, str) or not text:
        return ""
    text = mask_numbers(text)
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + "…"
    return f'<span class="err">{escape(text)}</span>'


def _counts(row: Mapping[Any, Any]) -> dict[str, int]:
    return {status: int(row.get(status) or 0) for status in STATUS_ORDER}


def legend() -> str:
    """The key to the bars' colours."""
    keys = "".join(
        f'<span><i class="k-{s}"></i>{escape(STATUS_LABELS[s])}</span>' for s in STATUS_ORDER
    )
    return f'<div class="legend" aria-hidden="true">{keys}</div>'


def _document(title: str, body: str) -> str:
    """A whole page around ``body``."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def _footer(now: datetime) -> str:
    return (
        f"<footer>As of {_time(now, seconds=True)} UTC; reloads every {REFRESH_SECONDS} s. "
        "Aggregates only: no phone numbers are shown. Also served: "
        '<a href="/tags">/tags</a> (JSON), <a href="/readyz">/readyz</a>, '
        '<a href="/metrics">/metrics</a>, <a href="/openapi.json">/openapi.json</a> (the '
        "HTTP API).</footer>"
    )


# --- GET / ------------------------------------------------------------------------------------


def _daemon_cards(view: DaemonView) -> str:
    now = view.now
    if view.problems:
        items = "".join(f"<li>{escape(mask_numbers(p))}</li>" for p in view.problems)
        ready = f'<div class="big bad">Not ready</div><ul class="problems">{items}</ul>'
    else:
        ready = '<div class="big ok">Ready</div><span class="muted">no problem reported</span>'
    uptime = "—" if view.started_at is None else duration(now - view.started_at)
    beat = relative(now, view.last_beat)
    polls = sum(view.polls.values())
    at_least = "≥ " if view.polls_capped else ""
    chips = "".join(
        f'<span class="chip" data-outcome="{escape(o)}">{_badge(f"o-{o}", o.replace("_", " "))} '
        f"{n:,}</span>"
        for o, n in sorted(view.polls.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    )
    if view.next_due is None:
        due = '<div class="big">—</div><span class="muted">no active tag</span>'
    else:
        tag, when = view.next_due
        due = (
            f'<div class="big"><a href="{escape(tag_href(tag))}">{escape(tag)}</a></div>'
            f'<span class="muted">{escape(_due(now, when))}'
            "</span>"
        )
    if view.auth_error:
        auth = f'<div class="big bad">Paused</div>{_error(view.auth_error)}'
    else:
        auth = '<div class="big ok">Running</div><span class="muted">API key accepted</span>'
    return (
        '<section class="cards" id="daemon">'
        f'<div class="card" id="readiness"><h3>Readiness</h3>{ready}</div>'
        f'<div class="card" id="polls"><h3>Polls, last hour</h3>'
        f'<div class="big">{at_least}{polls:,}</div><div class="chips">{chips}</div></div>'
        f'<div class="card" id="next-due"><h3>Next tag due</h3>{due}</div>'
        f'<div class="card" id="polling"><h3>Polling</h3>{auth}</div>'
        f'<div class="card" id="process"><h3>Daemon</h3>'
        f'<div class="big">up {escape(uptime)}</div>'
        f'<span class="muted">heartbeat {escape(beat)}</span>'
        f'<span class="sub mono">{escape(view.owner or "")}</span></div>'
        "</section>"
    )


def _due(now: datetime, when: datetime | None) -> str:
    return "due now" if when is None or when <= now else relative(now, when)


def _tag_row(now: datetime, row: Mapping[Any, Any]) -> str:
    tag = str(row["tag"])
    counts = _counts(row)
    total = int(row.get("total") or 0)
    delivered = counts["delivered"]
    failing = int(row.get("consecutive_failures") or 0)
    last = relative(now, row.get("last_run_at") or row.get("last_polled_at"))
    failing_note = f' <span class="sub bad">{failing} failing in a row</span>' if failing else ""
    return (
        f'<tr data-tag="{escape(tag)}">'
        f'<td class="tag" data-label="Tag"><a href="{escape(tag_href(tag))}">{escape(tag)}</a></td>'
        f'<td data-label="State">{_badge(str(row["state"]), str(row["state"]))}</td>'
        f'<td class="when" data-label="Sent">{_time(row["sent_at"])}'
        f' <span class="sub">{escape(relative(now, row["sent_at"]))}</span></td>'
        f'<td class="num" data-label="Numbers">{total:,}</td>'
        f'<td class="barcell" data-label="Statuses">{status_bar(counts, total)}</td>'
        f'<td class="num rate" data-label="Delivered">{_percent(delivered, total)}</td>'
        f'<td class="num" data-label="Opt-outs">{int(row.get("stop_sms") or 0):,}</td>'
        f'<td data-label="Last poll">{_outcome_badge(row.get("last_outcome"))}'
        f' <span class="sub">{escape(last)}</span>{failing_note}</td>'
        "</tr>"
    )


def _pager(page: int, pages: int) -> str:
    newer = f'<a href="/?page={page - 1}" rel="prev">← Newer</a>' if page > 1 else "<span></span>"
    older = (
        f'<a href="/?page={page + 1}" rel="next">Older →</a>' if page < pages else "<span></span>"
    )
    return (
        f'<nav class="pager">{newer}<span class="muted">Page {page} of {pages}</span>{older}</nav>'
    )


def render_index(
    view: DaemonView, tags: Sequence[Mapping[Any, Any]], *, page: int, total_tags: int
) -> str:
    """``GET /``: the daemon, then one page of tags (newest send first).

    Args:
        view: the daemon's state.
        tags: this page's rows of :func:`daemon.queries.newest_tags_page`.
        page: the page number, from 1.
        total_tags: how many tags there are (for the page count).
    """
    pages = max(1, -(-total_tags // PAGE_SIZE))
    banner = ""
    if view.auth_error:
        banner = (
            '<div class="banner bad" role="alert">Polling is paused: the API key was '
            f"rejected ({escape(mask_numbers(view.auth_error))}). It is tried again every "
            "5 minutes; fix SMSPARTNER_API_KEY and restart.</div>"
        )
    states = " · ".join(f"{n:,} {escape(s)}" for s, n in sorted(view.states.items()) if n)
    if tags:
        rows = "".join(_tag_row(view.now, row) for row in tags)
        table = (
            '<table class="tags stack"><thead><tr><th>Tag</th><th>State</th><th>Sent (UTC)</th>'
            '<th class="num">Numbers</th><th>Statuses</th><th class="num">Delivered</th>'
            '<th class="num">Opt-outs</th><th>Last poll</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )
    elif total_tags:
        table = '<p>No tags on this page. <a href="/">Back to the newest tags</a>.</p>'
    else:
        table = (
            "<p>No tag is tracked yet. Track one with <code>smspartner-status track TAG</code> "
            "or <code>POST /tags</code>.</p>"
        )
    pager = _pager(page, pages) if pages > 1 else ""
    body = (
        '<header class="top"><h1>SMS Partner delivery status</h1>'
        f'<span class="muted">{_time(view.now, seconds=True)} UTC</span></header>'
        f"{banner}{_daemon_cards(view)}"
        f'<h2 id="tags">Tags <span class="muted">{total_tags:,} tracked'
        f"{' · ' + states if states else ''}</span></h2>"
        f"{legend() if tags else ''}{table}{pager}{_footer(view.now)}"
    )
    return _document("smspartner-status", body)


# --- GET /ui/tags/{tag} -------------------------------------------------------------------------


def _history(now: datetime, runs: Sequence[Mapping[Any, Any]]) -> str:
    if not runs:
        return '<p class="muted">No poll of this tag is recorded yet.</p>'
    rows = []
    for run in runs:
        took = run["finished_at"] - run["started_at"]
        rows.append(
            "<tr>"
            f'<td class="when" data-label="Started">{_time(run["started_at"], seconds=True)}'
            f' <span class="sub">{escape(relative(now, run["started_at"]))}</span></td>'
            f'<td data-label="Outcome">{_outcome_badge(str(run["outcome"]))}</td>'
            f'<td class="num" data-label="Took">{took.total_seconds():.2f} s</td>'
            f'<td class="num" data-label="Pages">{int(run["pages"])}</td>'
            f'<td class="num" data-label="Seen">{int(run["numbers_seen"]):,}</td>'
            f'<td class="num" data-label="Changed">{int(run["numbers_changed"]):,}</td>'
            f'<td class="wide" data-label="Error">{_error(run["error"])}</td>'
            "</tr>"
        )
    return (
        '<table class="history stack"><thead><tr><th>Started (UTC)</th><th>Outcome</th>'
        '<th class="num">Took</th><th class="num">Pages</th><th class="num">Seen</th>'
        '<th class="num">Changed</th><th>Error</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _curve(curve: Curve, counts: Mapping[str, int]) -> str:
    """The delivery curve, or why there is none: numbers counted final whose rows are
    gone (``prune --statuses-older-than`` keeps a tag's counts, not its numbers) would
    draw a flat line at 0 %, which would be a lie."""
    final = sum(counts[s] for s in STATUS_ORDER if s not in ("waiting", "unknown"))
    if curve.total and final and not curve.points:
        return (
            '<p class="muted curve-pruned">No curve: this tag\'s numbers are no longer '
            "stored (pruned), only its counts.</p>"
        )
    return curve_svg(curve)


def render_tag(
    now: datetime, row: Mapping[Any, Any], curve: Curve, runs: Sequence[Mapping[Any, Any]]
) -> str:
    """``GET /ui/tags/{tag}``: one tag's counts, delivery curve and recent polls.

    Args:
        now: the time of the page.
        row: the tag (:func:`daemon.queries.tag_overview`).
        curve: its delivery curve (:func:`daemon.ui_chart.build_curve`).
        runs: its newest polls (:func:`daemon.queries.poll_history`).
    """
    tag = str(row["tag"])
    counts = _counts(row)
    total = int(row.get("total") or 0)
    state = str(row["state"])
    per_status = "".join(
        f'<span><i class="k-{s}"></i>{escape(STATUS_LABELS[s])} '
        f'<b class="num" data-status="{s}">{counts[s]:,}</b></span>'
        for s in STATUS_ORDER
    )
    next_poll = row.get("next_poll_at") if state == "active" else None
    cards = (
        '<section class="cards">'
        f'<div class="card"><h3>Sent</h3><div class="big">{_time(row["sent_at"])}</div>'
        f'<span class="muted">{escape(relative(now, row["sent_at"]))}; window ends '
        f"{escape(relative(now, row.get('window_ends_at'), never='—'))}</span></div>"
        f'<div class="card"><h3>Numbers</h3><div class="big">{total:,}</div>'
        f'<span class="muted">{int(row.get("stop_sms") or 0):,} opted out</span></div>'
        f'<div class="card"><h3>Delivered</h3><div class="big rate">'
        f"{_percent(counts['delivered'], total)}</div>"
        f'<span class="muted">{counts["delivered"]:,} of {total:,}</span></div>'
        f'<div class="card"><h3>Polls</h3>'
        f'<div class="big">{int(row.get("poll_count") or 0):,}</div>'
        f'<span class="muted">last {escape(relative(now, row.get("last_polled_at")))}'
        f"{'; next ' + escape(relative(now, next_poll)) if next_poll else ''}</span>"
        f"{_error(row.get('last_error')) if row.get('consecutive_failures') else ''}</div>"
        "</section>"
    )
    body = (
        '<nav><a href="/">← All tags</a></nav>'
        f'<header class="top"><h1>Tag <span class="mono tagname">{escape(tag)}</span></h1>'
        f"{_badge(state, state)}</header>"
        f"{cards}"
        f"<h2>Statuses</h2>{status_bar(counts, total, big=True)}"
        f'<div class="legend">{per_status}</div>'
        f"<h2>Delivery curve</h2>{_curve(curve, counts)}"
        f'<h2>Poll history <span class="muted">newest {HISTORY_SIZE}</span></h2>'
        f"{_history(now, runs)}{_footer(now)}"
    )
    return _document(f"{tag} · smspartner-status", body)


def render_not_found(now: datetime, tag: str) -> str:
    """The 404 page of a tag that was never tracked."""
    body = (
        '<nav><a href="/">← All tags</a></nav>'
        "<h1>No such tag</h1>"
        f'<p>No tag <span class="mono">{escape(tag)}</span> is tracked here. Tags are kept '
        "exactly as given, case included.</p>"
        f"{_footer(now)}"
    )
    return _document("No such tag · smspartner-status", body)
