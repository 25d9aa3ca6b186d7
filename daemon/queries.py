"""The reads for people: what ``report``, ``optouts``, ``tags``, ``GET /tags`` and the
poll's summary show. Nothing here writes.

Functions take an open :class:`~sqlalchemy.engine.Connection`; the write path is
:mod:`daemon.store`'s and :mod:`daemon.tracking`'s. The ``stream_…`` variants yield rows
as the database hands them over, for exports of any size (see :func:`stream`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from daemon.db import (
    COUNT_COLUMNS,
    COUNTED,
    UtcDateTime,
    account_optouts,
    delivery_statuses,
    poll_runs,
    stop_list_syncs,
    stop_sms_optouts,
    tag_counts,
    tracked_tags,
)

_ds, _tc, _tt = delivery_statuses.c, tag_counts.c, tracked_tags.c

#: The counts of the ``tag_summary`` view that a page of :func:`list_tags_page` carries.
SUMMARY_COUNTS = (*COUNT_COLUMNS, "delivery_rate")


def status_counts(conn: Connection, tag: str) -> dict[str, int]:
    """A tag's numbers per status, from its ``tag_counts`` row."""
    row = conn.execute(sa.select(tag_counts).where(_tc.tag == tag)).mappings().first()
    return {status: row[status] for status in COUNTED if row[status]} if row else {}


def tag_summary(conn: Connection, tag: str | None = None) -> list[RowMapping]:
    """Rows of the ``tag_summary`` view (all tags, or one), newest send first."""
    where = " WHERE tag = :tag" if tag else ""
    query = sa.text(f"SELECT * FROM tag_summary{where} ORDER BY sent_at DESC, tag").columns(
        sent_at=UtcDateTime(), window_ends_at=UtcDateTime(), last_polled_at=UtcDateTime()
    )
    params = {"tag": tag} if tag else {}
    return list(conn.execute(query, params).mappings())


def _tags_query() -> sa.Select[Any]:
    return sa.select(tracked_tags).order_by(_tt.sent_at.desc(), _tt.tag)


def list_tags(conn: Connection) -> list[RowMapping]:
    """Every tracked tag, newest send first."""
    return list(conn.execute(_tags_query()).mappings())


def list_tags_page(conn: Connection, *, after: str | None, limit: int) -> list[RowMapping]:
    """One page of tracked tags, ordered by tag, each with the counts of ``tag_summary``.

    Keyset pagination: the page holds the first ``limit`` tags greater than ``after``
    (the last tag of the previous page; None for the first page). Each page is one range
    scan of the primary key, so its cost and size do not grow with the table, and tags
    tracked or untracked between two pages never make another tag skipped or repeated,
    as an OFFSET would. Ordering and comparison both use the column's collation, so the
    pages agree with each other on either database.

    The counts are computed as the view computes them, from ``tag_counts``, rather than
    by joining the view: SQLite cannot merge a view that is itself a join into the right
    side of a LEFT JOIN, so it would build the whole view for every page.
    """
    joined, where = _tc.tag == _tt.tag, []
    if after is not None:
        # Repeated on tag_counts, so that a merge join scans both primary keys from the
        # cursor on, not tag_counts from its first row (PostgreSQL picks one at times).
        joined, where = sa.and_(joined, _tc.tag > after), [_tt.tag > after]
    query = _tags_with_counts(joined).where(*where).order_by(_tt.tag).limit(limit)
    return list(conn.execute(query).mappings())


def tag_with_counts(conn: Connection, tag: str) -> RowMapping | None:
    """One tracked tag with the counts of ``tag_summary``, as :func:`list_tags_page`
    gives it (``GET /tags/{tag}``); None when the tag was never tracked."""
    query = _tags_with_counts(_tc.tag == _tt.tag).where(_tt.tag == tag)
    return conn.execute(query).mappings().first()


def _tags_with_counts(joined: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """``tracked_tags`` left-joined to ``tag_counts`` on ``joined``, with the view's
    counts (0 for a tag not polled yet) and delivery rate (null while it has no number)."""
    counts = [sa.func.coalesce(_tc[name], 0).label(name) for name in SUMMARY_COUNTS[:-1]]
    rate = sa.case(
        (sa.func.coalesce(_tc.total, 0) == 0, None),
        else_=sa.cast(_tc.delivered, sa.Float()) / _tc.total,
    ).label("delivery_rate")
    return sa.select(tracked_tags, *counts, rate).select_from(
        tracked_tags.outerjoin(tag_counts, joined)
    )


def _numbers_query(tag: str) -> sa.Select[Any]:
    return (
        sa.select(
            _ds.phone_number,
            _ds.status,
            _ds.provider_status,
            _ds.stop_sms,
            _ds.reported_at,
            _ds.first_seen_at,
            _ds.resolved_at,
        )
        .where(_ds.tag == tag)
        .order_by(_ds.phone_number)
    )


def numbers(conn: Connection, tag: str) -> Sequence[RowMapping]:
    """Every number of a tag with its current status."""
    return conn.execute(_numbers_query(tag)).mappings().all()


def _optouts_query() -> sa.Select[Any]:
    return sa.select(stop_sms_optouts).order_by(
        stop_sms_optouts.c.first_seen_at, stop_sms_optouts.c.id
    )


def optouts(conn: Connection) -> Sequence[RowMapping]:
    """Every STOP opt-out, oldest first."""
    return conn.execute(_optouts_query()).mappings().all()


# --- streamed reads (exports) -----------------------------------------------------------

#: Rows fetched per round trip by :func:`stream`: a few hundred kilobytes at most.
STREAM_BATCH = 1000


def stream(conn: Connection, query: sa.Select[Any]) -> Iterator[RowMapping]:
    """Yield the rows of ``query`` as they arrive, :data:`STREAM_BATCH` at a time.

    ``yield_per`` makes PostgreSQL (psycopg) read through a server-side cursor: without
    it the driver loads the whole result before the first row, 1,000,000 numbers taking
    hundreds of megabytes. SQLite's cursor already steps through the result row by row.
    Either way only one batch is held, whatever the size of the tag. The reader holds
    one snapshot for as long as the export runs (``conn``'s transaction).
    """
    result = conn.execution_options(yield_per=STREAM_BATCH).execute(query)
    with result:
        yield from result.mappings()


def stream_numbers(conn: Connection, tag: str) -> Iterator[RowMapping]:
    """Every number of a tag, as :func:`numbers`, streamed."""
    return stream(conn, _numbers_query(tag))


def stream_optouts(conn: Connection) -> Iterator[RowMapping]:
    """Every STOP opt-out, as :func:`optouts`, streamed."""
    return stream(conn, _optouts_query())


def stream_tags(conn: Connection) -> Iterator[RowMapping]:
    """Every tracked tag, as :func:`list_tags`, streamed."""
    return stream(conn, _tags_query())


# --- the account's STOP list ------------------------------------------------------------


def account_list_query() -> sa.Select[Any]:
    """Every number of ``account_optouts`` (those removed from the list too), oldest
    listing first; numbers without a ``listed_at`` by when we first saw them."""
    ao = account_optouts.c
    return sa.select(account_optouts).order_by(
        sa.func.coalesce(ao.listed_at, ao.first_seen_at), ao.phone_number
    )


def account_list(conn: Connection) -> Sequence[RowMapping]:
    """The rows of :func:`account_list_query`, all at once (for a table or JSON)."""
    return conn.execute(account_list_query()).mappings().all()


def stream_account_list(conn: Connection) -> Iterator[RowMapping]:
    """The rows of :func:`account_list_query`, streamed (for CSV)."""
    return stream(conn, account_list_query())


def last_stop_list_sync(conn: Connection, *, ok_only: bool = False) -> RowMapping | None:
    """The newest ``stop_list_syncs`` row (or the newest successful one), or None."""
    sc = stop_list_syncs.c
    query = sa.select(stop_list_syncs).order_by(sc.started_at.desc(), sc.id.desc()).limit(1)
    if ok_only:
        query = query.where(sc.outcome == "ok")
    return conn.execute(query).mappings().first()


# --- the status page (``GET /`` and ``GET /ui/tags/{tag}``) -----------------------------------
#
# Each read below is bounded whatever the database holds: a page of tags by the
# ``sent_at`` index, one row per tag by primary key, the newest polls by ``id``, a tag's
# poll history by the (tag, started_at) index, and a tag's delivery curve grouped into
# minutes in SQL, so a request never carries millions of rows into Python.

_pr = poll_runs.c
#: The status page's "polls in the last hour" looks at most this many of the newest
#: polls (by id, the primary key): enough for 10,000 tags polled every minute for two
#: minutes, and a scan that costs a few milliseconds however long ``poll_runs`` grew.
RECENT_POLLS_SCANNED = 20_000
#: The Julian day number of 1970-01-01T00:00Z (SQLite's ``julianday()`` counts in them).
_UNIX_EPOCH_JULIAN_DAY = 2_440_587.5
#: The final statuses counted by the delivery curve (``expired`` is the daemon's own).
FINAL_STATUSES = ("delivered", "not_delivered", "failed", "expired")


def count_tags_by_state(conn: Connection) -> dict[str, int]:
    """How many tracked tags are in each state (one row per tag, no numbers read)."""
    query = sa.select(_tt.state, sa.func.count()).group_by(_tt.state)
    return {str(state): int(n) for state, n in conn.execute(query)}


def newest_tags_page(conn: Connection, *, offset: int, limit: int) -> list[RowMapping]:
    """A page of tracked tags, newest send first, with the counts of ``tag_summary`` and
    the outcome and start of each tag's last poll.

    The page's tags are chosen first, from the ``sent_at`` index alone; only those are
    joined to their counts (by primary key) and their last poll (the (tag, started_at)
    index of ``poll_runs``), so a far page costs an index walk, not a join per tag skipped.
    """
    keys = (
        sa.select(_tt.tag.label("key"), _tt.sent_at.label("sent"))
        .order_by(_tt.sent_at.desc(), _tt.tag)
        .limit(limit)
        .offset(offset)
        .subquery()
    )
    counts = [sa.func.coalesce(_tc[name], 0).label(name) for name in COUNT_COLUMNS]
    latest = (
        sa.select(_pr.id)
        .where(_pr.tag == _tt.tag)
        .order_by(_pr.started_at.desc(), _pr.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    page = (
        sa.select(
            _tt.tag,
            _tt.state,
            _tt.sent_at,
            _tt.last_polled_at,
            _tt.next_poll_at,
            _tt.consecutive_failures,
            latest.label("last_run_id"),
            *counts,
            keys.c.sent,
            keys.c.key,
        )
        .select_from(
            keys.join(tracked_tags, _tt.tag == keys.c.key).outerjoin(tag_counts, _tc.tag == _tt.tag)
        )
        .subquery()
    )
    columns = [c for c in page.c if c.name not in ("sent", "key", "last_run_id")]
    query = (
        sa.select(*columns, _pr.outcome.label("last_outcome"), _pr.started_at.label("last_run_at"))
        .select_from(page.outerjoin(poll_runs, _pr.id == page.c.last_run_id))
        .order_by(page.c.sent.desc(), page.c.key)
    )
    return list(conn.execute(query).mappings())


def next_due(conn: Connection) -> RowMapping | None:
    """The active tag polled next (``next_poll_at`` unset means due now), or None."""
    active = _tt.state == "active"
    unset = (
        sa.select(_tt.tag, _tt.next_poll_at)
        .where(active, _tt.next_poll_at.is_(None))
        .order_by(_tt.tag)
        .limit(1)
    )
    row = conn.execute(unset).mappings().first()
    if row is not None:
        return row
    soonest = (
        sa.select(_tt.tag, _tt.next_poll_at)
        .where(active, _tt.next_poll_at.is_not(None))
        .order_by(_tt.next_poll_at, _tt.tag)
        .limit(1)
    )
    return conn.execute(soonest).mappings().first()


def recent_poll_outcomes(
    conn: Connection, since: datetime, *, scanned: int = RECENT_POLLS_SCANNED
) -> tuple[dict[str, int], bool]:
    """Polls started since ``since``, by outcome, among the ``scanned`` newest polls.

    Returns:
        The counts, and whether the scan was full (so there may be more: the page says
        "at least").
    """
    newest = sa.select(_pr.outcome, _pr.started_at).order_by(_pr.id.desc()).limit(scanned)
    recent = newest.subquery()
    query = (
        sa.select(recent.c.outcome, sa.func.count())
        .where(recent.c.started_at >= since)
        .group_by(recent.c.outcome)
    )
    counts = {str(outcome): int(n) for outcome, n in conn.execute(query)}
    return counts, sum(counts.values()) >= scanned


def tag_overview(conn: Connection, tag: str) -> RowMapping | None:
    """One tracked tag with its counts (None when it was never tracked)."""
    counts = [sa.func.coalesce(_tc[name], 0).label(name) for name in COUNT_COLUMNS]
    query = (
        sa.select(tracked_tags, *counts)
        .select_from(tracked_tags.outerjoin(tag_counts, _tc.tag == _tt.tag))
        .where(_tt.tag == tag)
    )
    return conn.execute(query).mappings().first()


def poll_history(conn: Connection, tag: str, *, limit: int = 50) -> list[RowMapping]:
    """A tag's newest polls, newest first (the (tag, started_at) index)."""
    query = (
        sa.select(
            _pr.started_at,
            _pr.finished_at,
            _pr.outcome,
            _pr.pages,
            _pr.numbers_seen,
            _pr.numbers_changed,
            _pr.error,
        )
        .where(_pr.tag == tag)
        .order_by(_pr.started_at.desc(), _pr.id.desc())
        .limit(limit)
    )
    return list(conn.execute(query).mappings())


def resolution_minutes(
    conn: Connection, tag: str, sent_at: datetime, *, last_minute: int
) -> list[tuple[int, int, int]]:
    """A tag's numbers that reached a final status, per minute after ``sent_at``.

    Grouped in SQL from ``resolved_at`` (when each number became final) over the
    (tag, status) index: at most ``last_minute + 1`` rows come back, however many
    numbers the tag has. Numbers resolved before ``sent_at`` (a tag re-tracked with a
    later send time) count in minute 0, and those after ``last_minute`` in it.

    Returns:
        ``(minute, final, delivered)`` rows, by minute: numbers that became final (of
        them, delivered) during that minute after sending.
    """
    # The minute is computed once per row and clamped with two-argument min/max, which
    # both engines have (LEAST/GREATEST on PostgreSQL): a CASE would compute it thrice.
    if conn.dialect.name == "postgresql":
        sent = sa.literal(sent_at, UtcDateTime())
        minute: sa.ColumnElement[Any] = sa.func.floor(
            sa.func.extract("epoch", _ds.resolved_at - sent) / 60
        )
        clamped = sa.func.greatest(0, sa.func.least(minute, last_minute))
    else:
        # SQLite: the send time as a Julian day number, so only resolved_at is parsed per
        # row; CAST truncates (floor() needs SQLite's optional math functions).
        sent_day = sent_at.timestamp() / 86_400 + _UNIX_EPOCH_JULIAN_DAY
        minute = (sa.func.julianday(_ds.resolved_at) - sent_day) * 1440
        clamped = sa.func.max(0, sa.func.min(minute, last_minute))
    bucket = sa.cast(clamped, sa.Integer).label("minute")
    delivered = sa.func.sum(sa.case((_ds.status == "delivered", 1), else_=0))
    query = (
        sa.select(bucket, sa.func.count(), delivered)
        .where(_ds.tag == tag, _ds.status.in_(FINAL_STATUSES), _ds.resolved_at.is_not(None))
        .group_by(bucket)
        .order_by(bucket)
    )
    return [(int(m), int(n), int(d or 0)) for m, n, d in conn.execute(query)]
