"""The status page's two routes, between :mod:`daemon.http` and :mod:`daemon.ui`:
read the aggregates (:mod:`daemon.queries`), hand them to the renderer, answer HTML.

``GET /`` costs a handful of bounded reads however large the database: tags per state
(one row per tag), one page of tags by the ``sent_at`` index with their counts and
last poll by key, the newest polls by id, and the next tag due by the (state,
next_poll_at) index. ``GET /ui/tags/{tag}`` reads one tag by key, its newest polls, and
its delivery curve grouped per minute in SQL. :mod:`daemon.http` routes here and keeps
its own rules (methods, HEAD, a database error on a tag page is its JSON 503).
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timedelta
from http import HTTPStatus

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine

from daemon import queries, ui, ui_chart
from daemon.errors import InputError
from daemon.http_protocol import Reply

log = structlog.get_logger(__name__)

#: The largest ``page`` accepted (a million pages of 100 tags).
MAX_PAGE_NUMBER = 1_000_000
#: A tag in a path longer than this cannot exist (the column holds 64 characters;
#: rows inserted by another program are bounded by the column too).
_MAX_TAG_CHARS = 256
#: Where the curve stops counting, past the report window: expiry comes at most an hour
#: after the window closes; later reports are counted in the last minute.
_CURVE_SLACK = timedelta(hours=1)


def page_number(query: str) -> int:
    """The ``page`` of a ``GET /`` query string (1 when absent; others are ignored).

    Raises:
        InputError: ``page`` is not a whole number from 1 to :data:`MAX_PAGE_NUMBER`.
    """
    values = [v for k, _, v in (f.partition("=") for f in query.split("&")) if k == "page"]
    if not values:
        return 1
    raw = values[-1]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 7):
        raise InputError(
            f"page must be a whole number from 1 to {MAX_PAGE_NUMBER} (got {raw!r:.40})"
        )
    number = int(raw)
    if not 1 <= number <= MAX_PAGE_NUMBER:
        raise InputError(
            f"page must be a whole number from 1 to {MAX_PAGE_NUMBER} (got {raw!r:.40})"
        )
    return number


def html(status: int, page: str) -> Reply:
    """A page as an answer, with the pages' security headers."""
    return Reply(status, page.encode(), ui.PAGE_HEADERS, content_type=ui.CONTENT_TYPE)


def index(engine: Engine, view: ui.DaemonView, query: str) -> Reply:
    """``GET /``: the daemon and one page of tags.

    ``view`` comes without the database's part (polls, next due, states), filled in
    here. A database that does not answer makes the page a 503 that still shows the
    daemon, with the database among the reasons it is not ready.

    Raises:
        InputError: a bad ``page``.
    """
    page = page_number(query)
    now = view.now
    try:
        with engine.connect() as conn:
            states = queries.count_tags_by_state(conn)
            rows = queries.newest_tags_page(
                conn, offset=(page - 1) * ui.PAGE_SIZE, limit=ui.PAGE_SIZE
            )
            polls, capped = queries.recent_poll_outcomes(conn, now - timedelta(hours=1))
            due = queries.next_due(conn)
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        cause = getattr(exc, "orig", None) or exc
        log.warning("http.database_error", path="/", error=type(cause).__name__)
        down = dataclasses.replace(view, problems=[*view.problems, "database unreachable"])
        return html(HTTPStatus.SERVICE_UNAVAILABLE, ui.render_index(down, [], page=1, total_tags=0))
    view = dataclasses.replace(
        view,
        polls=polls,
        polls_capped=capped,
        next_due=None if due is None else (str(due["tag"]), due["next_poll_at"]),
        states=states,
    )
    return html(
        HTTPStatus.OK, ui.render_index(view, rows, page=page, total_tags=sum(states.values()))
    )


def tag(engine: Engine, now: datetime, tag_name: str | None, report_window: timedelta) -> Reply:
    """``GET /ui/tags/{tag}``: one tag's page, or a 404 page.

    Args:
        engine: the database.
        now: the time of the page.
        tag_name: the tag, percent-decoded (None: the path did not decode to one).
        report_window: the window of a tag whose row has none (another program's).
    """
    # NUL: no tag holds one, and PostgreSQL refuses it in a text parameter.
    if not tag_name or len(tag_name) > _MAX_TAG_CHARS or "\x00" in tag_name:
        shown = (tag_name or "").replace("\x00", "\\0")[:80]
        return html(HTTPStatus.NOT_FOUND, ui.render_not_found(now, shown))
    with engine.connect() as conn:
        row = queries.tag_overview(conn, tag_name)
        if row is None:
            return html(HTTPStatus.NOT_FOUND, ui.render_not_found(now, tag_name))
        sent_at: datetime = row["sent_at"]
        window_ends_at: datetime = row["window_ends_at"] or sent_at + report_window
        last_minute = max(
            1, math.ceil((window_ends_at + _CURVE_SLACK - sent_at).total_seconds() / 60)
        )
        counts = queries.resolution_minutes(conn, tag_name, sent_at, last_minute=last_minute)
        runs = queries.poll_history(conn, tag_name, limit=ui.HISTORY_SIZE)
    seen_until = min(row["last_polled_at"] or now, now)
    observed = min(max((seen_until - sent_at).total_seconds() / 60, 0.0), float(last_minute))
    curve = ui_chart.build_curve(counts, int(row["total"]), observed=observed)
    return html(HTTPStatus.OK, ui.render_tag(now, row, curve, runs))
