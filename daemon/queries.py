"""The reads for people: what ``report``, ``optouts``, ``tags``, ``GET /tags`` and the
poll's summary show. Nothing here writes.

Functions take an open :class:`~sqlalchemy.engine.Connection`; the write path is
:mod:`daemon.store`'s and :mod:`daemon.tracking`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# --- the account's STOP list ------------------------------------------------------------


def account_list(conn: Connection) -> Sequence[RowMapping]:
    """Every number of ``account_optouts`` (those removed from the list too), oldest
    listing first; numbers without a ``listed_at`` by when we first saw them."""
    ao = account_optouts.c
    query = sa.select(account_optouts).order_by(
        sa.func.coalesce(ao.listed_at, ao.first_seen_at), ao.phone_number
    )
    return conn.execute(query).mappings().all()


def last_stop_list_sync(conn: Connection, *, ok_only: bool = False) -> RowMapping | None:
    """The newest ``stop_list_syncs`` row (or the newest successful one), or None."""
    sc = stop_list_syncs.c
    query = sa.select(stop_list_syncs).order_by(sc.started_at.desc(), sc.id.desc()).limit(1)
    if ok_only:
        query = query.where(sc.outcome == "ok")
    return conn.execute(query).mappings().first()
