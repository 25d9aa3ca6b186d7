"""The write path on numbers: one poll's forward-only upsert, status events, opt-outs,
expiry, the tag's counts row and its ``poll_runs`` row.

Functions take an open :class:`~sqlalchemy.engine.Connection` and never commit: the
caller owns the transaction (one per poll of a tag). Upserts are single
``INSERT … ON CONFLICT … DO UPDATE … WHERE <forward-only>`` statements, so the rule
of :func:`daemon.status.supersedes` holds in the database itself, even when two
processes write the same row. Before writing, a poll diffs against what is stored
(:func:`daemon.diff.diff_reports`, pure) and sends only the numbers that would change,
so a re-poll of an unchanged tag writes nothing. The tag's own row is
:mod:`daemon.tracking`'s; the reads for people are :mod:`daemon.queries`'; retention's
deletes are :mod:`daemon.retention`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from daemon import sql
from daemon.db import (
    COUNTED,
    UtcDateTime,
    delivery_status_events,
    delivery_statuses,
    poll_runs,
    sqlite_text,
    stop_sms_optouts,
    tag_counts,
)
from daemon.diff import EVENT_KEYS, STATUS_KEYS, Diff, StoredState, Tally, diff_reports
from daemon.status import PENDING, PROVIDER_FINAL, PollOutcome, Report, Status

__all__ = ["Applied", "Tally", "apply_reports", "expire_pending", "record_poll_run"]

_ds = delivery_statuses.c


def _literal(status: Status) -> Any:
    """A status as an SQL literal, not a bound parameter: the bulk upsert's parameters
    (:func:`daemon.sql.bulk`) carry only the rows' own values."""
    return sa.literal_column(f"'{status.value}'")


def _values(statuses: Iterable[Status]) -> list[Any]:
    return [_literal(s) for s in sorted(statuses)]


@dataclass(slots=True)
class Applied:
    """What one poll changed."""

    changed: int = 0
    events: int = 0
    optouts: list[tuple[str, datetime | None]] = field(default_factory=list)
    #: Provider dates of numbers that got their first provider-final status (metrics).
    newly_final: list[datetime | None] = field(default_factory=list)
    #: Numbers per status once the poll is stored (the diff knows them: no count query).
    counts: dict[str, int] = field(default_factory=dict)
    #: Numbers that answered STOP, once the poll is stored.
    stop_sms: int = 0


def _forward_only(stmt: Any) -> tuple[Any, Any]:
    """SQL for "the incoming row's status replaces the stored one", and "stop turns on".

    The same rule as :func:`daemon.status.status_advances`, evaluated by the database.
    """
    old, new = _ds, stmt.excluded
    pending, provider_final = _values(PENDING), _values(PROVIDER_FINAL)
    later = sa.and_(
        new.reported_at.is_not(None),
        sa.or_(old.reported_at.is_(None), new.reported_at > old.reported_at),
    )
    advances = sa.or_(
        sa.and_(
            new.status.in_(provider_final),
            sa.or_(old.status.in_(pending), old.status == _literal(Status.EXPIRED), later),
        ),
        sa.and_(
            new.status.in_(pending),
            old.status.in_(pending),
            sa.or_(
                later,
                sa.and_(
                    new.reported_at.is_not_distinct_from(old.reported_at),
                    new.status == _literal(Status.UNKNOWN),
                    old.status == _literal(Status.WAITING),
                ),
            ),
        ),
    )
    stop_turns_on = sa.and_(new.stop_sms.is_(True), old.stop_sms.is_(False))
    return advances, stop_turns_on


@functools.cache
def _incoming() -> sa.Table:
    """PostgreSQL's temporary table for the COPY, built on first use: its
    ``postgresql_on_commit`` option imports the PostgreSQL dialect, which a SQLite
    command need not pay for."""
    return sa.Table(
        "incoming_statuses",
        sa.MetaData(),
        *(sa.Column(c.name, c.type) for c in delivery_statuses.c if c.name in STATUS_KEYS),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="delete_rows",
    )


def _copy_upsert_statuses(conn: Connection, rows: list[Any]) -> None:
    """PostgreSQL: COPY the rows into a temporary table, then one upsert from it,
    with the same forward-only WHERE: row-by-row upserts pay a foreign-key check each
    (figures in docs/performance.md)."""
    incoming = _incoming()
    conn.exec_driver_sql(
        str(sa.schema.CreateTable(incoming, if_not_exists=True).compile(dialect=conn.dialect))
    )
    sql.copy_rows(conn, incoming.name, STATUS_KEYS, rows)
    conn.execute(_upsert_statuses(conn, source=incoming))


def _upsert_statuses(
    conn: Connection, source: sa.Table | None = None, values: list[Any] | None = None
) -> Any:
    """The forward-only upsert of numbers' statuses (no RETURNING: the caller diffed).

    Values come from ``values`` (rows of bind parameters), from ``source``, or from
    the parameters of each execution.
    """
    stmt = sql.dialect_insert(conn, delivery_statuses)
    if values is not None:
        stmt = stmt.values(values)
    if source is not None:
        stmt = stmt.from_select(list(STATUS_KEYS), sa.select(*(source.c[k] for k in STATUS_KEYS)))
    old, new = _ds, stmt.excluded
    advances, stop_turns_on = _forward_only(stmt)
    became_final = sa.and_(
        advances, sa.or_(old.resolved_at.is_(None), old.status == _literal(Status.EXPIRED))
    )
    return stmt.on_conflict_do_update(
        index_elements=[_ds.tag, _ds.phone_number],
        set_={
            "status": sa.case((advances, new.status), else_=old.status),
            "provider_status": sa.case((advances, new.provider_status), else_=old.provider_status),
            "reported_at": sa.case((advances, new.reported_at), else_=old.reported_at),
            "resolved_at": sa.case((became_final, new.resolved_at), else_=old.resolved_at),
            "stop_sms": sa.or_(old.stop_sms, new.stop_sms),
            "updated_at": new.updated_at,
        },
        where=sa.or_(advances, stop_turns_on),
    )


def _insert_events(values: list[Any]) -> Any:
    return sa.insert(delivery_status_events).values(values)


#: SQLite's copy of a new tag's first sightings: the rows its first poll inserted come
#: after the last id stored before it, in id order on disk. Read so ("+tag" keeps the
#: tag's index out, which would order them by status), they cost a fifth less.
_FIRST_SEEN_SQLITE = (
    f"INSERT INTO delivery_status_events ({', '.join(EVENT_KEYS)}) "
    "SELECT tag, phone_number, NULL, status, reported_at, first_seen_at "
    "FROM delivery_statuses WHERE id > ? AND +tag = ? AND first_seen_at = ?"
)


def _last_status_id(conn: Connection) -> int:
    """SQLite: the highest ``delivery_statuses.id`` (0 for none); the rows the
    transaction inserts next get higher ids (one writer at a time)."""
    last: int | None = conn.exec_driver_sql("SELECT max(id) FROM delivery_statuses").scalar()
    return last or 0


def _first_seen_events(conn: Connection, tag: str, now: datetime, *, after_id: int) -> None:
    """Events (old status NULL) for the numbers this poll inserted (first seen now).

    For a tag with nothing stored yet, where that is every row of the tag (on SQLite,
    every row above ``after_id``): the database copies its own rows rather than have
    them all sent again.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(_FIRST_SEEN_SQLITE, (after_id, tag, sqlite_text(now)))
        return

    def build() -> Any:
        new_rows = sa.select(
            _ds.tag, _ds.phone_number, sa.null(), _ds.status, _ds.reported_at, _ds.first_seen_at
        ).where(
            _ds.tag == sa.bindparam("tag"),
            _ds.first_seen_at == sa.bindparam("now", type_=UtcDateTime()),
        )
        return sa.insert(delivery_status_events).from_select(list(EVENT_KEYS), new_rows)

    sql.execute(conn, "first_seen_events", build, tag=tag, now=now)


#: Numbers per statement when reading back only some of a tag's numbers.
_NUMBERS_PER_READ = 500
_STATE_COLUMNS = (_ds.phone_number, _ds.status, _ds.stop_sms, _ds.reported_at)


def _stored_states(
    conn: Connection, tag: str, only: Collection[str] | None = None
) -> dict[str, StoredState]:
    """What is stored for a tag (or for the numbers ``only`` of it): number →
    ``(number, status, stop_sms, reported_at)``, the driver's own tuple.

    The driver's tuples, without SQLAlchemy's rows or conversions: a cold re-poll of a
    large tag reads every row back, and the diff compares them as they are.
    """
    if only is None:
        return _fetch_states(
            conn,
            "stored_states",
            lambda: sa.select(*_STATE_COLUMNS).where(_ds.tag == sa.bindparam("tag")),
            tag=tag,
        )
    per = _NUMBERS_PER_READ
    names = [f"n{i}" for i in range(per)]

    def of_numbers() -> Any:
        wanted: list[Any] = [sa.bindparam(name) for name in names]
        return sa.select(*_STATE_COLUMNS).where(
            _ds.tag == sa.bindparam("tag"), _ds.phone_number.in_(wanted)
        )

    numbers, states = list(only), {}
    for start in range(0, len(numbers), per):
        chunk = numbers[start : start + per]
        chunk += chunk[-1:] * (per - len(chunk))  # one statement: pad with a repeat
        params = dict(zip(names, chunk, strict=True))
        states.update(_fetch_states(conn, "stored_states_of", of_numbers, tag=tag, **params))
    return states


def _fetch_states(
    conn: Connection, name: str, build: Callable[[], Any], **params: Any
) -> dict[str, StoredState]:
    """Run a read of stored states through the driver (see :func:`daemon.sql.execute`);
    a driver error is raised as SQLAlchemy would raise it, for the callers' handlers."""
    result = sql.execute(conn, name, build, **params)
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        rows = result.cursor.fetchall()
    except dbapi_error as exc:
        raise sa.exc.DBAPIError.instance(None, None, exc, dbapi_error) from exc
    finally:
        result.close()
    return {row[0]: row for row in rows}


def apply_reports(
    conn: Connection,
    tag: str,
    reports: Mapping[str, Report],
    *,
    now: datetime,
    tally: Tally | None = None,
) -> Applied:
    """Upsert one poll's merged reports; write an event per real status change and an
    opt-out row per new STOP.

    Call after :func:`daemon.tracking.lock_tag` in the same transaction: the diff against
    what is stored decides which rows to send and which events to write, and the upsert's
    WHERE re-applies the forward-only rule in the database as a safety net.

    ``tally``: the tag's counts as they stand, when the caller knows them (it stored
    them itself, and nothing else wrote since). Then only the numbers in ``reports``
    are read back, instead of the whole tag.
    """
    stored = _stored_states(conn, tag, None if tally is None else reports.keys())
    diff = diff_reports(
        tag,
        reports,
        stored,
        tally=tally,
        now=now,
        to_db=sql.db_time(conn),
        from_db=sql.from_db_time(conn),
    )
    sqlite_copy = diff.copy_first_sightings and conn.dialect.name == "sqlite"
    after_id = _last_status_id(conn) if sqlite_copy else 0
    _write(conn, diff)
    if diff.copy_first_sightings:
        _first_seen_events(conn, tag, now, after_id=after_id)
    if diff.rows:
        _save_counts_row(conn, tag, diff.tally.counts, diff.tally.stop_sms, now=now)
    return Applied(
        changed=diff.changed,
        events=diff.event_count,
        optouts=_insert_optouts(conn, diff.optouts) if diff.optouts else [],
        newly_final=diff.newly_final,
        counts=dict(diff.tally.counts),
        stop_sms=diff.tally.stop_sms,
    )


def _write(conn: Connection, diff: Diff) -> None:
    """Write the diff's events and rows: by COPY on PostgreSQL, 100 rows to a statement
    on SQLite (:mod:`daemon.sql`)."""
    if conn.dialect.name == "postgresql":
        if diff.events:
            sql.copy_rows(conn, delivery_status_events.name, EVENT_KEYS, diff.events)
        if diff.rows:
            _copy_upsert_statuses(conn, diff.rows)
    else:
        sql.bulk(conn, "insert_events", _insert_events, EVENT_KEYS, diff.events)
        upsert = functools.partial(_upsert_statuses, conn, None)
        sql.bulk(conn, "upsert_statuses", upsert, STATUS_KEYS, diff.rows)


def _insert_optouts(
    conn: Connection, rows: list[dict[str, Any]]
) -> list[tuple[str, datetime | None]]:
    """Insert opt-out rows; returns ``(number, reported_at)`` of those that were new."""
    stmt = (
        sql.dialect_insert(conn, stop_sms_optouts)
        .on_conflict_do_nothing(index_elements=["phone_number", "tag"])
        .returning(stop_sms_optouts.c.phone_number, stop_sms_optouts.c.reported_at)
    )
    return [(phone, reported) for phone, reported in conn.execute(stmt, rows).all()]


def expire_pending(conn: Connection, tag: str, *, now: datetime) -> int:
    """Mark every still-pending number of a closed window ``expired``, with its events."""
    pending = _values(PENDING)
    where = sa.and_(_ds.tag == tag, _ds.status.in_(pending))
    source = sa.select(
        _ds.tag,
        _ds.phone_number,
        _ds.status,
        sa.literal(Status.EXPIRED.value),
        _ds.reported_at,
        sa.literal(now, type_=delivery_status_events.c.observed_at.type),
    ).where(where)
    conn.execute(
        sa.insert(delivery_status_events).from_select(
            ["tag", "phone_number", "old_status", "new_status", "reported_at", "observed_at"],
            source,
        )
    )
    result = conn.execute(
        sa.update(delivery_statuses)
        .where(where)
        .values(status=Status.EXPIRED.value, resolved_at=now, updated_at=now)
    )
    if result.rowcount:
        tc = tag_counts.c
        conn.execute(
            sa.update(tag_counts)
            .where(tc.tag == tag)
            .values(
                expired=tc.expired + tc.waiting + tc.unknown, waiting=0, unknown=0, updated_at=now
            )
        )
    return result.rowcount


def _save_counts(conn: Connection) -> Any:
    stmt = sql.dialect_insert(conn, tag_counts).values(
        {c.name: sa.bindparam(c.name, type_=c.type) for c in tag_counts.c}
    )
    return stmt.on_conflict_do_update(
        index_elements=[tag_counts.c.tag],
        set_={c.name: stmt.excluded[c.name] for c in tag_counts.c if c.name != "tag"},
    )


def _save_counts_row(
    conn: Connection, tag: str, counts: Mapping[str, int], stop_sms: int, *, now: datetime
) -> None:
    """Write a tag's ``tag_counts`` row (what ``tag_summary`` shows) in the transaction
    that changed its numbers: absolute numbers from the diff, so no drift can build up."""
    sql.execute(
        conn,
        "save_counts",
        lambda: _save_counts(conn),
        tag=tag,
        total=sum(counts.values()),
        stop_sms=stop_sms,
        updated_at=now,
        **{status: counts.get(status, 0) for status in COUNTED},
    )


def record_poll_run(
    conn: Connection,
    tag: str,
    *,
    started_at: datetime,
    finished_at: datetime,
    outcome: PollOutcome,
    pages: int = 0,
    numbers_seen: int = 0,
    numbers_changed: int = 0,
    error: str | None = None,
) -> None:
    """One ``poll_runs`` row."""
    sql.execute(
        conn,
        "poll_run",
        lambda: sa.insert(poll_runs).values(
            {c.name: sa.bindparam(c.name, type_=c.type) for c in poll_runs.c if c.name != "id"}
        ),
        tag=tag,
        started_at=started_at,
        finished_at=finished_at,
        outcome=outcome.value,
        pages=pages,
        numbers_seen=numbers_seen,
        numbers_changed=numbers_changed,
        error=error,
    )
