"""The reads for people: what ``report``, ``optouts``, ``tags``, ``GET /tags`` and the
poll's summary show. Nothing here writes.

Functions take an open :class:`~sqlalchemy.engine.Connection`; the write path is
:mod:`daemon.store`'s and :mod:`daemon.tracking`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from daemon.db import (
    COUNT_COLUMNS,
    COUNTED,
    UtcDateTime,
    delivery_statuses,
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
