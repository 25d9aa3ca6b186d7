"""The statements: every read and write of our tables, one function each.

Functions take an open :class:`~sqlalchemy.engine.Connection` and never commit: the
caller owns the transaction (one per poll of a tag). Upserts are single
``INSERT … ON CONFLICT … DO UPDATE … WHERE <forward-only>`` statements, so the rule
of :func:`daemon.status.supersedes` holds in the database itself, even when two
processes write the same row. Before writing, a poll diffs against what is stored and
sends only the numbers that would change, so a re-poll of an unchanged tag writes
nothing.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping

from daemon.db import (
    COUNTED,
    UtcDateTime,
    delivery_status_events,
    delivery_statuses,
    poll_runs,
    sqlite_parse,
    sqlite_text,
    stop_sms_optouts,
    tag_counts,
    tracked_tags,
)
from daemon.status import (
    FINAL,
    PENDING,
    PROVIDER_FINAL,
    Report,
    Status,
    status_advances,
    supersedes,
)

# Dict lookups are several times cheaper than Status(text) and .value on 100,000 rows.
_STATUS_BY_VALUE = {s.value: s for s in Status}
_VALUE_OF = {s: s.value for s in Status}
_ds = delivery_statuses.c
_STATUS_KEYS = (
    "tag", "phone_number", "status", "provider_status", "stop_sms", "reported_at",
    "first_seen_at", "resolved_at", "updated_at",
)  # fmt: skip
_EVENT_KEYS = ("tag", "phone_number", "old_status", "new_status", "reported_at", "observed_at")
_tt = tracked_tags.c


def _insert(conn: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (both engines spell it the same)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def _literal(status: Status) -> Any:
    """A status as an SQL literal, not a bound parameter: the bulk upsert is run with
    the driver's executemany, whose rows carry only the row's own values."""
    return sa.literal_column(f"'{status.value}'")


def _values(statuses: Iterable[Status]) -> list[Any]:
    return [_literal(s) for s in sorted(statuses)]


# --- tags -----------------------------------------------------------------------------


def get_tag(conn: Connection, tag: str) -> RowMapping | None:
    """One ``tracked_tags`` row, or None."""
    return conn.execute(sa.select(tracked_tags).where(_tt.tag == tag)).mappings().first()


def list_tags(conn: Connection) -> list[RowMapping]:
    """Every tracked tag, newest send first."""
    query = sa.select(tracked_tags).order_by(_tt.sent_at.desc(), _tt.tag)
    return list(conn.execute(query).mappings())


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

    One statement run with the driver's executemany: building the upsert per tag cost
    ~1.3 ms, which made a 10,000-tag ``track --from-file`` take 14 s.
    """
    stmt = _insert(conn, tracked_tags).values(
        tag=sa.bindparam("tag", type_=_tt.tag.type),
        sent_at=sa.bindparam("sent_at", type_=UtcDateTime()),
        window_ends_at=sa.bindparam("window_ends_at", type_=UtcDateTime()),
        state="active",
        next_poll_at=now,
        created_at=now,
        updated_at=now,
    )
    later = stmt.excluded.sent_at > _tt.sent_at
    stmt = stmt.on_conflict_do_update(
        index_elements=[_tt.tag],
        set_={
            "state": "active",
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
        .values(state="untracked", next_poll_at=None, updated_at=now)
    )
    return result.rowcount > 0


def fill_missing_windows(conn: Connection, *, window: Any, now: datetime) -> list[str]:
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
                window_ends_at=sent_at + window,
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
        _tt.state == "active",
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
    same tag either. Both statements are fixed and run through the driver: at 10,000
    tags a claim runs once per poll.
    """
    exclude = set(exclude)
    params = {"now": now, "owner": owner}
    found = _execute(
        conn, "due_tags", lambda: _due_tags(conn), limit=limit + len(exclude), **params
    )
    tags = [tag for (tag,) in found if tag not in exclude][:limit]
    # On SQLite the SELECT runs before the write lock is taken (the driver begins the
    # transaction at the first write), so two workers claiming at once may pick the same
    # tag: only the UPDATE that still finds it due wins it.
    return [
        tag
        for tag in tags
        if _execute(conn, "lease", _lease, tag=tag, lease_until=lease_until, **params).rowcount
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
    counters = (
        {"last_success_at": now, "consecutive_failures": 0}
        if ok
        else {"consecutive_failures": _tt.consecutive_failures + 1}
    )
    return (
        sa.update(tracked_tags)
        .where(_tt.tag == sa.bindparam("tag"))
        .values(
            last_polled_at=now,
            poll_count=_tt.poll_count + 1,
            state=sa.bindparam("state"),
            next_poll_at=sa.bindparam("next_poll_at", type_=UtcDateTime()),
            last_error=sa.bindparam("error"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            **counters,
        )
    )


def finish_poll(
    conn: Connection,
    tag: str,
    *,
    now: datetime,
    ok: bool,
    state: str,
    next_poll_at: datetime | None,
    error: str | None = None,
) -> None:
    """Record a poll's effect on its tag: counters, state, next due time, lease released."""
    _execute(
        conn,
        f"finish_{ok}",
        lambda: _finish(ok),
        tag=tag,
        now=now,
        state=state,
        next_poll_at=next_poll_at,
        error=error,
    )


# --- statuses ---------------------------------------------------------------------------


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


_incoming = sa.Table(
    "incoming_statuses",
    sa.MetaData(),
    *(sa.Column(c.name, c.type) for c in delivery_statuses.c if c.name in _STATUS_KEYS),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="delete_rows",
)


def _copy(conn: Connection, table: str, keys: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """PostgreSQL: COPY rows (tuples in ``keys`` order) into ``table``."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(f"COPY {table} ({', '.join(keys)}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
    finally:
        cursor.close()


def _copy_upsert_statuses(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """PostgreSQL: COPY the rows into a temporary table, then one upsert from it.

    Row-by-row upserts into a table with a foreign key cost PostgreSQL ~150 µs each (a
    foreign-key check per row on the speculative-insert path): 100,000 numbers took 15 s.
    COPY plus a single ``INSERT … SELECT … ON CONFLICT`` does the same work in ~4 s, and
    the forward-only WHERE is the same expression.
    """
    conn.exec_driver_sql(
        str(sa.schema.CreateTable(_incoming, if_not_exists=True).compile(dialect=conn.dialect))
    )
    _copy(conn, _incoming.name, _STATUS_KEYS, rows)
    conn.execute(_upsert_statuses(conn, source=_incoming))


def _upsert_statuses(
    conn: Connection, source: sa.Table | None = None, values: list[Any] | None = None
) -> Any:
    """The forward-only upsert of numbers' statuses (no RETURNING: the caller diffed).

    Values come from ``values`` (rows of bind parameters), from ``source``, or from
    the parameters of each execution.
    """
    stmt = _insert(conn, delivery_statuses)
    if values is not None:
        stmt = stmt.values(values)
    if source is not None:
        stmt = stmt.from_select(list(_STATUS_KEYS), sa.select(*(source.c[k] for k in _STATUS_KEYS)))
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


_COMPILED: dict[tuple[Any, ...], Any] = {}


def _compiled(conn: Connection, name: str, build: Callable[[], Any]) -> Any:
    """``build()`` compiled for the connection's dialect, once per process and dialect.

    SQL handed to the driver directly skips SQLAlchemy's compiled cache: building and
    compiling the forward-only upsert on every poll cost ~5 ms, more than all the other
    database work of a poll of a small tag (``tests/benchmarks/tags_10k.py``).
    """
    dialect = conn.dialect
    key = (name, type(dialect), dialect.paramstyle, dialect.server_version_info)
    found = _COMPILED.get(key)
    if found is None:
        found = _COMPILED[key] = build().compile(dialect=dialect)
    return found


#: Rows per statement for SQLite's bulk writes: 9 columns × 100 rows stays under the
#: 999 bound values that older SQLite builds allow.
_SQLITE_ROWS_PER_STATEMENT = 100


def _bulk(
    conn: Connection,
    name: str,
    build: Callable[[list[dict[str, Any]]], Any],
    keys: Sequence[str],
    rows: list[tuple[Any, ...]],
) -> None:
    """SQLite: run ``build(values)`` (an INSERT taking ``.values(values)``) for many
    rows, given as tuples in ``keys`` order, through the driver.

    The rows go 100 to a statement: executed once per row, the upsert re-opened the
    table's and its four indexes' cursors every time and took twice as long. The values
    skip SQLAlchemy's processors (~20 µs a row), so they must already be in the driver's
    form (see ``_db_time``). PostgreSQL COPYs instead (:func:`_copy`).
    """
    per = _SQLITE_ROWS_PER_STATEMENT
    whole = len(rows) - len(rows) % per
    if whole:
        batches = [tuple(chain.from_iterable(rows[i : i + per])) for i in range(0, whole, per)]
        _run_values(conn, name, build, keys, per, batches)
    if whole < len(rows):
        _run_values(conn, name, build, keys, 1, rows[whole:])


def _run_values(
    conn: Connection,
    name: str,
    build: Callable[[list[dict[str, Any]]], Any],
    keys: Sequence[str],
    per: int,
    params: list[tuple[Any, ...]],
) -> None:
    """Execute ``build`` with ``per`` rows of VALUES, once per tuple of ``params``."""
    names = [f"{key}_{i}" for i in range(per) for key in keys]

    def values() -> Any:
        return build([{key: sa.bindparam(f"{key}_{i}") for key in keys} for i in range(per)])

    compiled = _compiled(conn, f"{name}/{per}", values)
    if list(compiled.positiontup) != names:  # placeholders in another order
        get = operator.itemgetter(*(names.index(name) for name in compiled.positiontup))
        params = [get(row) for row in params]
    conn.exec_driver_sql(str(compiled), params)


def _execute(conn: Connection, name: str, build: Callable[[], Any], **params: Any) -> Any:
    """Run a fixed statement with named bind parameters through the driver.

    For the statements every poll runs: SQLAlchemy's statement building, cache-key
    generation and parameter processing cost ~0.3 ms each, which at 10,000 small tags
    was most of the daemon's own work per poll. Datetimes are converted here (the only
    bound type that needs it); rows come back in the driver's form.
    """
    compiled = _compiled(conn, name, build)
    to_db = _db_time(conn)
    values = compiled.params  # the constants the statement binds, e.g. "+ 1"
    values.update((k, to_db(v) if isinstance(v, datetime) else v) for k, v in params.items())
    if compiled.positiontup is not None:  # "?" placeholders
        return conn.exec_driver_sql(str(compiled), tuple(values[k] for k in compiled.positiontup))
    return conn.exec_driver_sql(str(compiled), values)


def _from_db_time(conn: Connection) -> Callable[[Any], datetime | None]:
    """The inverse of :func:`_db_time`: the driver's value → aware UTC datetime."""
    if conn.dialect.name == "sqlite":
        return sqlite_parse
    return lambda v: None if v is None else v.astimezone(UTC)


def _db_time(conn: Connection) -> Any:
    """Datetime → the driver's form: ISO text on SQLite, the datetime itself elsewhere."""
    if conn.dialect.name == "sqlite":
        return lambda v: None if v is None else sqlite_text(v)
    return lambda v: v


def _insert_events(values: list[Any]) -> Any:
    return sa.insert(delivery_status_events).values(values)


def _first_seen_events(conn: Connection, tag: str, now: datetime) -> None:
    """Events (old status NULL) for the numbers this poll inserted (first seen now).

    For a tag with nothing stored yet, where that is every row of the tag: the
    database copies its own rows, instead of 100,000 rows sent back in.
    """

    def build() -> Any:
        new_rows = sa.select(
            _ds.tag, _ds.phone_number, sa.null(), _ds.status, _ds.reported_at, _ds.first_seen_at
        ).where(
            _ds.tag == sa.bindparam("tag"),
            _ds.first_seen_at == sa.bindparam("now", type_=UtcDateTime()),
        )
        return sa.insert(delivery_status_events).from_select(list(_EVENT_KEYS), new_rows)

    _execute(conn, "first_seen_events", build, tag=tag, now=now)


def lock_tag(conn: Connection, tag: str, *, now: datetime) -> dict[str, Any] | None:
    """Take the tag's row lock for this transaction and read the row; None when the tag
    is not tracked.

    Polls of one tag are serialised by it: on PostgreSQL a row lock, on SQLite the
    database write lock (the first write of the transaction takes it). The row returned,
    and everything read afterwards in the transaction, is therefore exactly what the
    poll's writes replace.
    """
    found = _execute(
        conn,
        "lock_tag",
        lambda: (
            sa.update(tracked_tags)
            .where(_tt.tag == sa.bindparam("tag"))
            .values(updated_at=sa.bindparam("now", type_=UtcDateTime()))
            .returning(*tracked_tags.c)
        ),
        tag=tag,
        now=now,
    ).first()
    if found is None:
        return None
    from_db = _from_db_time(conn)
    return {
        column.name: from_db(value) if isinstance(column.type, UtcDateTime) else value
        for column, value in zip(tracked_tags.c, found, strict=True)
    }


def _stored_states(conn: Connection, tag: str) -> dict[str, tuple[Any, ...]]:
    """What is stored for a tag: number → ``(number, status, stop_sms, reported_at)``,
    the driver's own tuple.

    A re-poll of a 100,000-number tag reads every row back, so this skips SQLAlchemy's
    row objects and every conversion: :func:`apply_reports` compares the tuples as they
    are and builds a :class:`Report` only for a number whose values differ.
    """
    result = _execute(
        conn,
        "stored_states",
        lambda: sa.select(_ds.phone_number, _ds.status, _ds.stop_sms, _ds.reported_at).where(
            _ds.tag == sa.bindparam("tag")
        ),
        tag=tag,
    )
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        rows = result.cursor.fetchall()
    except dbapi_error as exc:  # raised as SQLAlchemy would, for the callers' handlers
        raise sa.exc.DBAPIError.instance(None, None, exc, dbapi_error) from exc
    finally:
        result.close()
    return {row[0]: row for row in rows}


def apply_reports(
    conn: Connection, tag: str, reports: Mapping[str, Report], *, now: datetime
) -> Applied:
    """Upsert one poll's merged reports; write an event per real status change and an
    opt-out row per new STOP.

    Call after :func:`lock_tag` in the same transaction: the diff against what is
    stored decides which rows to send and which events to write, and the upsert's WHERE
    re-applies the forward-only rule in the database as a safety net.
    """
    stored = _stored_states(conn, tag)
    to_db, from_db = _db_time(conn), _from_db_time(conn)
    now_db = to_db(now)
    value, by_value = _VALUE_OF, _STATUS_BY_VALUE
    # A campaign's reports share few distinct seconds: convert each once.
    dates = {when: to_db(when) for when in {new.reported_at for new in reports.values()}}
    resolved = {status: now_db if status in FINAL else None for status in Status}
    fresh: list[Report] = []  # numbers seen for the first time
    changed: list[tuple[Report, Report]] = []  # (new, old) where new supersedes old
    for phone, new in reports.items():
        row = stored.get(phone)
        if row is None:
            fresh.append(new)
        elif row != (phone, value[new.status], new.stop_sms, dates[new.reported_at]):
            # Equal values can never supersede; only a difference needs the full rule.
            old = Report(phone, by_value[row[1]], "", bool(row[2]), from_db(row[3]))
            if supersedes(new, old):
                changed.append((new, old))

    written = fresh + [new for new, _ in changed]
    moved = [(new, old) for new, old in changed if status_advances(new, old)]
    rows = [
        (tag, phone, value[status], provider, stop, dates[reported], now_db, resolved[status],
         now_db)
        for phone, status, provider, stop, reported in written
    ]  # fmt: skip
    # A new tag's first sightings are copied by the database (_first_seen_events); on a
    # re-poll the few new numbers are sent along, rather than scanning the whole tag.
    events = [
        (tag, phone, None, value[status], dates[reported], now_db)
        for phone, status, _, _, reported in (fresh if stored else [])
    ] + [
        (tag, new.phone_number, value[old.status], value[new.status], dates[new.reported_at],
         now_db)
        for new, old in moved
        if new.status is not old.status
    ]  # fmt: skip
    counts = Counter(map(operator.itemgetter(1), stored.values()))
    counts.update(value[new.status] for new in fresh)
    counts.subtract(value[old.status] for _, old in moved)
    counts.update(value[new.status] for new, _ in moved)
    stops = [
        {"phone_number": new.phone_number, "tag": tag, "reported_at": new.reported_at,
         "first_seen_at": now}
        for new in fresh + [new for new, old in changed if not old.stop_sms]
        if new.stop_sms
    ]  # fmt: skip
    applied = Applied(
        changed=len(rows),
        events=len(events) + (0 if stored else len(fresh)),
        newly_final=[new.reported_at for new in fresh if new.status in PROVIDER_FINAL]
        + [
            new.reported_at
            for new, old in moved
            if new.status in PROVIDER_FINAL and old.status not in PROVIDER_FINAL
        ],
        counts={status: n for status, n in counts.items() if n},
        stop_sms=sum(map(operator.itemgetter(2), stored.values())) + len(stops),
    )
    if conn.dialect.name == "postgresql":
        if events:
            _copy(conn, delivery_status_events.name, _EVENT_KEYS, events)
        if rows:
            _copy_upsert_statuses(conn, rows)
    else:
        _bulk(conn, "insert_events", _insert_events, _EVENT_KEYS, events)
        upsert = functools.partial(_upsert_statuses, conn, None)
        _bulk(conn, "upsert_statuses", upsert, _STATUS_KEYS, rows)
    if fresh and not stored:
        _first_seen_events(conn, tag, now)
    if rows:
        _save_counts_row(conn, tag, applied.counts, applied.stop_sms, now=now)
    if stops:
        stmt = (
            _insert(conn, stop_sms_optouts)
            .on_conflict_do_nothing(index_elements=["phone_number", "tag"])
            .returning(stop_sms_optouts.c.phone_number, stop_sms_optouts.c.reported_at)
        )
        applied.optouts = [(p, r) for p, r in conn.execute(stmt, stops).all()]
    return applied


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


def status_counts(conn: Connection, tag: str) -> dict[str, int]:
    """A tag's numbers per status, from its ``tag_counts`` row."""
    row = conn.execute(sa.select(tag_counts).where(tag_counts.c.tag == tag)).mappings().first()
    return {status: row[status] for status in COUNTED if row[status]} if row else {}


def _save_counts(conn: Connection) -> Any:
    stmt = _insert(conn, tag_counts).values(
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
    _execute(
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
    outcome: str,
    pages: int = 0,
    numbers_seen: int = 0,
    numbers_changed: int = 0,
    error: str | None = None,
) -> None:
    """One ``poll_runs`` row."""
    _execute(
        conn,
        "poll_run",
        lambda: sa.insert(poll_runs).values(
            {c.name: sa.bindparam(c.name, type_=c.type) for c in poll_runs.c if c.name != "id"}
        ),
        tag=tag,
        started_at=started_at,
        finished_at=finished_at,
        outcome=outcome,
        pages=pages,
        numbers_seen=numbers_seen,
        numbers_changed=numbers_changed,
        error=error,
    )


# --- reports for people ------------------------------------------------------------------


def tag_summary(conn: Connection, tag: str | None = None) -> list[RowMapping]:
    """Rows of the ``tag_summary`` view (all tags, or one), newest send first."""
    where = " WHERE tag = :tag" if tag else ""
    query = sa.text(f"SELECT * FROM tag_summary{where} ORDER BY sent_at DESC, tag").columns(
        sent_at=UtcDateTime(), window_ends_at=UtcDateTime(), last_polled_at=UtcDateTime()
    )
    params = {"tag": tag} if tag else {}
    return list(conn.execute(query, params).mappings())


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


# --- retention ------------------------------------------------------------------------
#
# A Prunable is a table and the predicate of the rows a prune removes from it. Batches
# delete at most ``limit`` of them with ids in (``after``, ``upto``], the oldest first,
# with ``DELETE … WHERE id IN (SELECT id … ORDER BY id LIMIT n)`` (both engines accept
# it); the caller commits after each batch, so no lock is held for long, and passes the
# batch's last id as the next ``after``. ``upto`` is the last matching id when the prune
# began: rows written since are newer than any cutoff. Without the two bounds, a batch
# re-read every row the cutoff keeps in front of the ones it deletes, and the last batch
# every kept row behind them: on 20 million events, seconds under SQLite's write lock.

#: Tag states whose numbers are no longer polled; only their statuses may be pruned.
RETIRED_STATES = ("completed", "expired", "untracked")
_ev = delivery_status_events.c


class Prunable(NamedTuple):
    """The rows of ``table`` a prune deletes: those matching ``where``."""

    table: sa.Table
    where: Any


class Batch(NamedTuple):
    """One prune batch: rows deleted, and the highest id among them (the next ``after``)."""

    deleted: int
    last_id: int


def _retired_tags(before: datetime) -> Any:
    """Tags no longer polled whose report window ended before ``before``."""
    return sa.select(_tt.tag).where(_tt.state.in_(RETIRED_STATES), _tt.window_ends_at < before)


def events_to_prune(cutoff: datetime | None, *, retired_before: datetime | None) -> Prunable:
    """Status events observed before ``cutoff`` (None: none by age), and with
    ``retired_before`` every event of the tags :func:`statuses_to_prune` selects."""
    conditions = []
    if cutoff is not None:
        conditions.append(_ev.observed_at < cutoff)
    if retired_before is not None:
        conditions.append(_ev.tag.in_(_retired_tags(retired_before)))
    return Prunable(delivery_status_events, sa.or_(*conditions) if conditions else sa.false())


def statuses_to_prune(cutoff: datetime) -> Prunable:
    """The ``delivery_statuses`` rows of retired tags: no longer polled (completed,
    expired or untracked) and their report window ended before ``cutoff``. The tag's
    ``tracked_tags`` and ``tag_counts`` rows and its opt-outs stay."""
    return Prunable(delivery_statuses, _ds.tag.in_(_retired_tags(cutoff)))


def poll_runs_to_prune(cutoff: datetime) -> Prunable:
    """``poll_runs`` rows that finished before ``cutoff``."""
    return Prunable(poll_runs, poll_runs.c.finished_at < cutoff)


def optouts_to_prune(cutoff: datetime) -> Prunable:
    """Opt-outs first seen before ``cutoff`` (only when asked: an opt-out is what keeps
    a number from being messaged again)."""
    return Prunable(stop_sms_optouts, stop_sms_optouts.c.first_seen_at < cutoff)


def last_prunable_id(conn: Connection, rows: Prunable) -> int:
    """The highest id a prune of ``rows`` has to reach (0: nothing to delete). A read:
    on SQLite it runs outside the write lock, however long the scan."""
    return int(conn.scalar(sa.select(sa.func.max(rows.table.c.id)).where(rows.where)) or 0)


def delete_batch(conn: Connection, rows: Prunable, limit: int, *, after: int, upto: int) -> Batch:
    """Delete up to ``limit`` of ``rows`` with ids in (``after``, ``upto``]."""
    id_ = rows.table.c.id
    ids = sa.select(id_).where(rows.where, id_ > after, id_ <= upto).order_by(id_).limit(limit)
    deleted = conn.scalars(sa.delete(rows.table).where(id_.in_(ids)).returning(id_)).all()
    return Batch(len(deleted), max(deleted, default=after))


def count_prunable(conn: Connection, rows: Prunable) -> int:
    """How many rows a prune of ``rows`` would delete (a dry run)."""
    query = sa.select(sa.func.count()).select_from(rows.table).where(rows.where)
    return int(conn.scalar(query) or 0)
