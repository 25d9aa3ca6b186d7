"""The statements on ``tracked_tags``: track and untrack, claims and leases, and the
tag's side of a poll (its row lock, then its counters, state and next due time). The
listings for people are :mod:`daemon.queries`'.

Functions take an open :class:`~sqlalchemy.engine.Connection` and never commit: the
caller owns the transaction. The statements the daemon runs for every poll or claim
are fixed and go through :mod:`daemon.sql`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from daemon import sql
from daemon.db import UtcDateTime, tracked_tags
from daemon.errors import InputError
from daemon.status import Decision, TagState, window_end

#: How far ahead of now a ``sent_at`` may be: clocks differ a little, campaigns are not
#: sent from the future (a typo such as 9998-12-31 made a tag polled every minute forever).
SENT_AT_MAX_AHEAD = timedelta(days=1)

_tt = tracked_tags.c


def get_tag(conn: Connection, tag: str) -> RowMapping | None:
    """One ``tracked_tags`` row, or None."""
    return conn.execute(sa.select(tracked_tags).where(_tt.tag == tag)).mappings().first()


def sent_at_problem(sent_at: datetime, now: datetime) -> str | None:
    """Why ``sent_at`` cannot be a campaign's send time at ``now``, or None when it can."""
    if sent_at - now > SENT_AT_MAX_AHEAD:
        return (
            f"{_iso(sent_at)} is more than a day ahead of now ({_iso(now)}); give the time "
            "the campaign was sent"
        )
    return None


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def track(
    conn: Connection, tag: str, *, sent_at: datetime, window_ends_at: datetime, now: datetime
) -> None:
    """Start tracking a tag, or re-activate it.

    Re-tracking moves the window to the new ``sent_at`` only when it is later, and makes
    the tag due now; a tag's stored numbers are never touched.
    """
    track_many(conn, [(tag, sent_at, window_ends_at)], now=now)


def track_many(
    conn: Connection, tags: Iterable[tuple[str, datetime, datetime]], *, now: datetime
) -> None:
    """:func:`track` for many distinct ``(tag, sent_at, window_ends_at)`` at once.

    One statement run with the driver's executemany, so that a large
    ``track --from-file`` does not build the upsert once per tag.

    Every caller that tracks (the CLI, ``POST /tags``, a tag file) passes here, so the
    rule on ``sent_at`` is checked here, before anything is written.

    Raises:
        InputError: a ``sent_at`` more than :data:`SENT_AT_MAX_AHEAD` ahead of ``now``.
    """
    tags = list(tags)
    for tag, sent_at, _ in tags:
        if problem := sent_at_problem(sent_at, now):
            raise InputError(f"sent_at: {problem} (tag {tag!r})")
    stmt = sql.dialect_insert(conn, tracked_tags).values(
        tag=sa.bindparam("tag", type_=_tt.tag.type),
        sent_at=sa.bindparam("sent_at", type_=UtcDateTime()),
        window_ends_at=sa.bindparam("window_ends_at", type_=UtcDateTime()),
        state=TagState.ACTIVE.value,
        next_poll_at=now,
        created_at=now,
        updated_at=now,
    )
    later = stmt.excluded.sent_at > _tt.sent_at
    stmt = stmt.on_conflict_do_update(
        index_elements=[_tt.tag],
        set_={
            "state": TagState.ACTIVE.value,
            "sent_at": sa.case((later, stmt.excluded.sent_at), else_=_tt.sent_at),
            "window_ends_at": sa.case(
                (later, stmt.excluded.window_ends_at), else_=_tt.window_ends_at
            ),
            "next_poll_at": stmt.excluded.next_poll_at,
            "consecutive_failures": 0,
            "updated_at": now,
        },
    )
    rows = [{"tag": t, "sent_at": s, "window_ends_at": w} for t, s, w in tags]
    if rows:
        conn.execute(stmt, rows)


def untrack(conn: Connection, tag: str, *, now: datetime) -> bool:
    """Stop polling a tag (its data stays); False when the tag is not tracked."""
    result = conn.execute(
        sa.update(tracked_tags)
        .where(_tt.tag == tag)
        .values(state=TagState.UNTRACKED.value, next_poll_at=None, updated_at=now)
    )
    return result.rowcount > 0


def fill_missing_windows(conn: Connection, *, window: timedelta, now: datetime) -> list[str]:
    """Complete rows that another program inserted with only a tag (and maybe sent_at).

    Such rows have no ``window_ends_at``; give them one and make them due now.
    """
    rows = conn.execute(sa.select(_tt.tag, _tt.sent_at).where(_tt.window_ends_at.is_(None))).all()
    for tag, sent_at in rows:
        conn.execute(
            sa.update(tracked_tags)
            .where(_tt.tag == tag)
            .values(
                sent_at=sent_at,  # rewritten in our canonical format
                window_ends_at=window_end(sent_at, window),
                next_poll_at=sa.func.coalesce(_tt.next_poll_at, now),
                updated_at=now,
            )
        )
    return [tag for tag, _ in rows]


def _due(now: Any, owner: Any) -> tuple[Any, ...]:
    """Active, due (``next_poll_at`` has come or was never set), and free: never leased,
    lease expired, or leased by ``owner`` itself — whose callers exclude the tags they
    are polling, so any other lease of theirs is stale (a poll cut off by a database
    error could not release it)."""
    return (
        _tt.state == TagState.ACTIVE.value,
        sa.or_(_tt.next_poll_at.is_(None), _tt.next_poll_at <= now),
        sa.or_(
            _tt.lease_expires_at.is_(None), _tt.lease_expires_at <= now, _tt.lease_owner == owner
        ),
    )


def _due_tags(conn: Connection) -> Any:
    now, owner = sa.bindparam("now", type_=UtcDateTime()), sa.bindparam("owner", type_=sa.String())
    query = (
        sa.select(_tt.tag)
        .where(*_due(now, owner))
        .order_by(_tt.next_poll_at)  # walks the (state, next_poll_at) index
        .limit(sa.bindparam("limit", type_=sa.Integer()))
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return query


def _lease() -> Any:
    now, owner = sa.bindparam("now", type_=UtcDateTime()), sa.bindparam("owner", type_=sa.String())
    return (
        sa.update(tracked_tags)
        .where(_tt.tag == sa.bindparam("tag"), *_due(now, owner))
        .values(lease_owner=owner, lease_expires_at=sa.bindparam("lease_until", UtcDateTime()))
    )


def claim_due(
    conn: Connection,
    *,
    now: datetime,
    owner: str,
    lease_until: datetime,
    limit: int,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Lease up to ``limit`` due active tags to ``owner``; the caller commits at once.

    ``exclude`` are the tags the caller is polling itself. On PostgreSQL the candidate
    rows are locked with ``FOR UPDATE SKIP LOCKED``, so replicas claiming at the same
    moment get disjoint sets instead of waiting on each other; on SQLite the lease is
    taken by a conditional UPDATE, so concurrent claimers in one process never get the
    same tag either. Both statements are fixed and run through the driver, as a claim
    runs once per poll.
    """
    exclude = set(exclude)
    params = {"now": now, "owner": owner}
    found = sql.execute(
        conn, "due_tags", lambda: _due_tags(conn), limit=limit + len(exclude), **params
    )
    tags = [tag for (tag,) in found if tag not in exclude][:limit]
    # On SQLite the SELECT runs before the write lock is taken (the driver begins the
    # transaction at the first write), so two workers claiming at once may pick the same
    # tag: only the UPDATE that still finds it due wins it.
    return [
        tag
        for tag in tags
        if sql.execute(conn, "lease", _lease, tag=tag, lease_until=lease_until, **params).rowcount
    ]


def renew_leases(
    conn: Connection, tags: Iterable[str], *, owner: str, lease_until: datetime
) -> None:
    """Extend ``owner``'s leases on tags it is still polling."""
    tags = list(tags)
    if tags:
        conn.execute(
            sa.update(tracked_tags)
            .where(_tt.tag.in_(tags), _tt.lease_owner == owner)
            .values(lease_expires_at=lease_until)
        )


def release_leases(conn: Connection, *, owner: str) -> None:
    """Drop every lease ``owner`` holds (clean shutdown: others may poll at once)."""
    conn.execute(
        sa.update(tracked_tags)
        .where(_tt.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
    )


def _finish(ok: bool) -> Any:
    now = sa.bindparam("now", type_=UtcDateTime())
    success = {"last_success_at": now} if ok else {}
    return (
        sa.update(tracked_tags)
        .where(_tt.tag == sa.bindparam("tag"))
        .values(
            last_polled_at=now,
            poll_count=_tt.poll_count + 1,
            state=sa.bindparam("state"),
            next_poll_at=sa.bindparam("next_poll_at", type_=UtcDateTime()),
            consecutive_failures=sa.bindparam("failures", type_=sa.Integer()),
            last_error=sa.bindparam("error"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            **success,
        )
    )


def finish_poll(
    conn: Connection, tag: str, *, now: datetime, decision: Decision, error: str | None = None
) -> None:
    """Write a poll's :class:`~daemon.status.Decision` on its tag (state, next due time,
    failure count), count the poll, release the lease, and keep ``error`` (None after a
    success, which the decision's zero failures tell).

    Call after :func:`lock_tag` in the same transaction: the decision was made from the
    locked row, so writing its failure count is the same as incrementing it.
    """
    ok = decision.consecutive_failures == 0  # decide() resets them on success only
    sql.execute(
        conn,
        f"finish_{ok}",
        lambda: _finish(ok),
        tag=tag,
        now=now,
        state=decision.state.value,
        next_poll_at=decision.next_poll_at,
        failures=decision.consecutive_failures,
        error=error,
    )


def lock_tag(conn: Connection, tag: str) -> dict[str, Any] | None:
    """Take the tag's row lock for this transaction and read the row; None when the tag
    is not tracked.

    Polls of one tag are serialised by it: on PostgreSQL a row lock, on SQLite the
    database write lock (the first write of the transaction takes it). The row returned,
    and everything read afterwards in the transaction, is therefore exactly what the
    poll's writes replace. The write changes nothing, so the row comes back as the last
    writer left it (:mod:`daemon.answers` relies on that).
    """
    found = sql.execute(
        conn,
        "lock_tag",
        lambda: (
            sa.update(tracked_tags)
            .where(_tt.tag == sa.bindparam("tag"))
            .values(updated_at=_tt.updated_at)
            .returning(*tracked_tags.c)
        ),
        tag=tag,
    ).first()
    if found is None:
        return None
    from_db = sql.from_db_time(conn)
    return {
        column.name: from_db(value) if isinstance(column.type, UtcDateTime) else value
        for column, value in zip(tracked_tags.c, found, strict=True)
    }
