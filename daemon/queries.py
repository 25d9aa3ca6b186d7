"""The reads for people: what ``report``, ``optouts``, ``tags``, ``GET /tags`` and the
poll's summary show. Nothing here writes.

Functions take an open :class:`~sqlalchemy.engine.Connection`; the write path is
:mod:`daemon.store`'s and :mod:`daemon.tracking`'s. The ``stream_…`` variants yield rows
as the database hands them over, for exports of any size (see :func:`stream`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from daemon.db import (
    COUNT_COLUMNS,
    COUNTED,
    UtcDateTime,
    account_optouts,
    delivery_statuses,
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


def list_tags(conn: Connection) -> list[RowMapping]:
    """Every tracked tag, newest send first."""
    query = sa.select(tracked_tags).order_by(_tt.sent_at.desc(), _tt.tag)
    return list(conn.execute(query).mappings())


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
    counts = [sa.func.coalesce(_tc[name], 0).label(name) for name in SUMMARY_COUNTS[:-1]]
    rate = sa.case(
        (sa.func.coalesce(_tc.total, 0) == 0, None),
        else_=sa.cast(_tc.delivered, sa.Float()) / _tc.total,
    ).label("delivery_rate")
    joined, where = _tc.tag == _tt.tag, []
    if after is not None:
        # Repeated on tag_counts, so that a merge join scans both primary keys from the
        # cursor on, not tag_counts from its first row (PostgreSQL picks one at times).
        joined, where = sa.and_(joined, _tc.tag > after), [_tt.tag > after]
    query = (
        sa.select(tracked_tags, *counts, rate)
        .select_from(tracked_tags.outerjoin(tag_counts, joined))
        .where(*where)
        .order_by(_tt.tag)
        .limit(limit)
    )
    return list(conn.execute(query).mappings())


def numbers(conn: Connection, tag: str) -> Sequence[RowMapping]:
    """Every number of a tag with its current status."""
    query = (
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
    return conn.execute(query).mappings().all()


def optouts(conn: Connection) -> Sequence[RowMapping]:
    """Every STOP opt-out, oldest first."""
    query = sa.select(stop_sms_optouts).order_by(
        stop_sms_optouts.c.first_seen_at, stop_sms_optouts.c.id
    )
    return conn.execute(query).mappings().all()


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
    query = (
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
    return stream(conn, query)


def stream_optouts(conn: Connection) -> Iterator[RowMapping]:
    """Every STOP opt-out, as :func:`optouts`, streamed."""
    query = sa.select(stop_sms_optouts).order_by(
        stop_sms_optouts.c.first_seen_at, stop_sms_optouts.c.id
    )
    return stream(conn, query)


def stream_tags(conn: Connection) -> Iterator[RowMapping]:
    """Every tracked tag, as :func:`list_tags`, streamed."""
    return stream(conn, sa.select(tracked_tags).order_by(_tt.sent_at.desc(), _tt.tag))


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
