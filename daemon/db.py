"""The schema (Alembic's ``target_metadata``), the engine and the migration entry point.

The tables and the ``tag_summary`` view are the BI contract of design.md: their names
and columns are public API. Timestamps are always aware UTC in Python;
PostgreSQL stores ``timestamp with time zone``, SQLite ISO-8601 text ending in ``Z``
(``2026-11-26T17:46:53.000000Z``) so that text comparison is time order.
"""

from __future__ import annotations

import fcntl
import os
import threading
import urllib.parse
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from daemon.errors import ConfigError, DatabaseBusyError
from daemon.status import PollOutcome, Status, TagState


def sqlite_text(value: datetime) -> str:
    """How SQLite stores a timestamp: ISO-8601 UTC with microseconds and ``Z``.

    Fixed width, so text order is time order. Also used by the store's bulk statements,
    which hand values to the driver directly.
    """
    if value.tzinfo is not UTC:
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def sqlite_parse(value: str | None) -> datetime | None:
    """Read a SQLite timestamp back as an aware UTC datetime."""
    # fromisoformat reads our format, SQLite's CURRENT_TIMESTAMP ("2026-11-26 17:46:53")
    # and the millisecond form of our server default, for rows other programs insert.
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


class _SqliteUtc(sqlite.DATETIME):
    """SQLite's DATETIME column type with fast, fixed-format processors.

    SQLAlchemy's own regexp-based processors cost ~8 µs a value, which dominated a
    100,000-number poll; ``isoformat``/``fromisoformat`` are C and cost well under 1 µs.
    """

    def bind_processor(self, dialect: Dialect) -> Any:
        return lambda value: None if value is None else sqlite_text(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        return sqlite_parse


class UtcDateTime(sa.TypeDecorator[datetime]):
    """An aware-UTC datetime on both engines; naive datetimes are refused."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_SqliteUtc())  # type: ignore[no-untyped-call]
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is UTC:
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class utcnow(FunctionElement[datetime]):
    """The database's current UTC time, in the column format of each engine."""

    type = UtcDateTime()
    inherit_cache = True


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"


@compiles(utcnow)
def _utcnow_default(element: utcnow, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


#: Driver errors that mean "the database cannot be reached or used right now" (as opposed
#: to a constraint violation, which is a bug): retried by the schedule, fail readiness.
UNAVAILABLE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError)

TAG_STATES = tuple(s.value for s in TagState)
POLL_OUTCOMES = tuple(o.value for o in PollOutcome)
_STATUSES = tuple(s.value for s in Status)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


#: Constraint and index names follow this convention, so they are stable across engines
#: and migrations.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BIGINT on PostgreSQL (tables of tens of millions of rows); INTEGER on SQLite, where
# only "INTEGER PRIMARY KEY" is the fast rowid alias.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Core tables, not ORM classes: nothing maps rows to objects, and importing
# sqlalchemy.orm was a tenth of SQLAlchemy's import on every command that opens the
# database (docs/performance.md).


def _id() -> sa.Column[int]:
    return sa.Column("id", BigId, primary_key=True, autoincrement=True)


def _utc(name: str, *, nullable: bool, **kw: Any) -> sa.Column[datetime]:
    return sa.Column(name, UtcDateTime, nullable=nullable, **kw)


def _int(name: str, **kw: Any) -> sa.Column[int]:
    return sa.Column(name, sa.Integer, nullable=False, **kw)


#: A tag whose numbers we follow, with its schedule and lease.
tracked_tags = sa.Table(
    "tracked_tags",
    metadata,
    sa.Column("tag", sa.String(64), primary_key=True),
    _utc("sent_at", nullable=False, server_default=utcnow()),
    # Null in a row another program inserted: the daemon fills it from sent_at.
    _utc("window_ends_at", nullable=True),
    sa.Column("state", sa.String(16), nullable=False, server_default="active"),
    _utc("next_poll_at", nullable=True),
    _utc("last_polled_at", nullable=True),
    _utc("last_success_at", nullable=True),
    _int("poll_count", server_default="0"),
    _int("consecutive_failures", server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    _utc("lease_expires_at", nullable=True),
    _utc("created_at", nullable=False, server_default=utcnow()),
    _utc("updated_at", nullable=False, server_default=utcnow()),
    sa.CheckConstraint(_in("state", TAG_STATES), name="state"),
    sa.Index(None, "state", "next_poll_at"),
    sa.Index(None, "sent_at"),  # "the last 30 days of campaigns"
)

#: The current status of one number under one tag.
delivery_statuses = sa.Table(
    "delivery_statuses",
    metadata,
    _id(),
    sa.Column("tag", sa.String(64), sa.ForeignKey("tracked_tags.tag"), nullable=False),
    sa.Column("phone_number", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("provider_status", sa.Text, nullable=True),
    sa.Column("stop_sms", sa.Boolean, nullable=False, server_default=sa.false()),
    _utc("reported_at", nullable=True),
    _utc("first_seen_at", nullable=False),
    _utc("resolved_at", nullable=True),
    _utc("updated_at", nullable=False),
    sa.UniqueConstraint("tag", "phone_number"),
    sa.CheckConstraint(_in("status", _STATUSES), name="status"),
    sa.Index(None, "status"),
    sa.Index(None, "tag", "status"),
)

#: One real status change of one number (the first sighting included).
delivery_status_events = sa.Table(
    "delivery_status_events",
    metadata,
    _id(),
    sa.Column("tag", sa.String(64), nullable=False),
    sa.Column("phone_number", sa.String(64), nullable=False),
    sa.Column("old_status", sa.String(16), nullable=True),
    sa.Column("new_status", sa.String(16), nullable=False),
    _utc("reported_at", nullable=True),
    _utc("observed_at", nullable=False),
    sa.Index(None, "tag", "phone_number"),
    sa.Index(None, "observed_at"),
)

#: A number that answered STOP to a campaign; never pruned unless asked.
stop_sms_optouts = sa.Table(
    "stop_sms_optouts",
    metadata,
    _id(),
    sa.Column("phone_number", sa.String(64), nullable=False),
    sa.Column("tag", sa.String(64), nullable=False),
    _utc("reported_at", nullable=True),
    _utc("first_seen_at", nullable=False),
    sa.UniqueConstraint("phone_number", "tag"),
)

#: One poll of one tag, successful or not.
poll_runs = sa.Table(
    "poll_runs",
    metadata,
    _id(),
    sa.Column("tag", sa.String(64), nullable=False),
    _utc("started_at", nullable=False),
    _utc("finished_at", nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    _int("pages", server_default="0"),
    _int("numbers_seen", server_default="0"),
    _int("numbers_changed", server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    sa.CheckConstraint(_in("outcome", POLL_OUTCOMES), name="outcome"),
    sa.Index(None, "tag", "started_at"),
)

#: A tag's numbers per status, kept by the poll that changes them (same transaction).
#: ``tag_summary`` reads these instead of counting ``delivery_statuses``: a dashboard of
#: the last 30 days of campaigns would otherwise count millions of rows per refresh.
#: A tag's counts outlive a ``prune --statuses-older-than`` of its numbers.
#: The per-tag counts ``tag_counts`` keeps (and ``tag_summary`` shows), in column order.
COUNT_COLUMNS = (
    "total",
    "waiting",
    "delivered",
    "not_delivered",
    "failed",
    "expired",
    "unknown",
    "stop_sms",
)

tag_counts = sa.Table(
    "tag_counts",
    metadata,
    sa.Column("tag", sa.String(64), sa.ForeignKey("tracked_tags.tag"), primary_key=True),
    *(_int(name, server_default="0") for name in COUNT_COLUMNS),
    _utc("updated_at", nullable=False, server_default=utcnow()),
)


def _count(status: str) -> str:
    return f"SUM(CASE WHEN d.status = '{status}' THEN 1 ELSE 0 END)"


#: The BI view as revision 0001 created it, counting ``delivery_statuses`` on every
#: read (the revisions carry their own copies; this one is for tests comparing with it).
TAG_SUMMARY_SQL_0001 = f"""
SELECT t.tag AS tag, t.sent_at AS sent_at, t.window_ends_at AS window_ends_at,
       t.state AS state,
       COUNT(d.id) AS total,
       {_count("waiting")} AS waiting,
       {_count("delivered")} AS delivered,
       {_count("not_delivered")} AS not_delivered,
       {_count("failed")} AS failed,
       {_count("expired")} AS expired,
       {_count("unknown")} AS unknown,
       SUM(CASE WHEN d.stop_sms THEN 1 ELSE 0 END) AS stop_sms,
       CASE WHEN COUNT(d.id) = 0 THEN NULL
            ELSE CAST({_count("delivered")} AS DOUBLE PRECISION) / COUNT(d.id)
       END AS delivery_rate,
       t.last_polled_at AS last_polled_at
FROM tracked_tags t
LEFT JOIN delivery_statuses d ON d.tag = t.tag
GROUP BY t.tag, t.sent_at, t.window_ends_at, t.state, t.last_polled_at
"""

COUNTED = ("waiting", "delivered", "not_delivered", "failed", "expired", "unknown")


def _kept(column: str) -> str:
    return f"CAST(COALESCE(c.{column}, 0) AS BIGINT) AS {column}"


#: The BI view; its columns (names and types) are public API. It reads the counts the
#: poller keeps in ``tag_counts``: one row per tag instead of one per number. The
#: newest revision creates it from its own copy, and a test checks that the two agree:
#: changing the view here takes a new revision.
TAG_SUMMARY_SQL = f"""
SELECT t.tag AS tag, t.sent_at AS sent_at, t.window_ends_at AS window_ends_at,
       t.state AS state,
       {", ".join(_kept(c) for c in ("total", *COUNTED, "stop_sms"))},
       CASE WHEN COALESCE(c.total, 0) = 0 THEN NULL
            ELSE CAST(c.delivered AS DOUBLE PRECISION) / c.total
       END AS delivery_rate,
       t.last_polled_at AS last_polled_at
FROM tracked_tags t
LEFT JOIN tag_counts c ON c.tag = t.tag
"""

#: Recount every tag from ``delivery_statuses`` into an empty ``tag_counts`` (tests and
#: benchmarks that generate rows directly in SQL; revision 0002 has its own copy).
TAG_COUNTS_FROM_STATUSES_SQL = f"""
INSERT INTO tag_counts (tag, total, {", ".join(COUNTED)}, stop_sms, updated_at)
SELECT d.tag, COUNT(*), {", ".join(_count(c) for c in COUNTED)},
       SUM(CASE WHEN d.stop_sms THEN 1 ELSE 0 END), :now
FROM delivery_statuses d
GROUP BY d.tag
"""


def create_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine tuned per dialect.

    SQLite: WAL (readers never block the writer: BI tools can read while we poll), a
    busy timeout instead of instant "database is locked", foreign keys on.
    PostgreSQL: pre-ping so a restarted server costs one failed checkout, not a crash.

    Raises:
        ConfigError: a SQLite file's directory cannot be created, or the file created.
    """
    sa_url = sa.engine.make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            _make_directory(path)
            if not sa_url.query.get("uri"):  # a file: URI is not a plain path
                _create_file(path)
        engine = sa.create_engine(url, echo=echo, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    # A bounded connect timeout: an unreachable server must fail a readiness probe or a
    # dispatch quickly, not hang until the kernel gives up on TCP.
    return sa.create_engine(
        sa_url, echo=echo, pool_pre_ping=True, connect_args={"connect_timeout": 5}
    )


_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_WRITE_LOCKS_GUARD = threading.Lock()


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()``, with this process's writers taking turns on SQLite.

    SQLite has one writer; threads that meet its lock wait in the busy handler's sleeps
    of up to 100 ms, which made 4 workers far slower than 1. A Python lock hands the
    turn over at once. PostgreSQL writers run concurrently as usual.
    """
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.setdefault(engine, threading.Lock())
    with lock, engine.begin() as conn:
        yield conn


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    sa_url = sa.engine.make_url(url)
    if sa_url.get_backend_name() != "sqlite" or sqlite_in_memory(url):
        return None
    database = str(sa_url.database)
    if sa_url.query.get("uri") and database.startswith("file:"):
        # file:/abs/path, file:relative, file:///abs/path (a URI filename, query apart)
        parsed = urllib.parse.urlsplit(database)
        return Path(urllib.parse.unquote(parsed.path)).expanduser()
    return Path(database).expanduser()


def sqlite_in_memory(url: str) -> bool:
    """Whether a SQLite URL names an in-memory database (``sqlite://``,
    ``sqlite:///:memory:``, a ``file::memory:`` or ``mode=memory`` URI): each connection
    gets its own, and nothing outlives the process."""
    sa_url = sa.engine.make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        return False
    database = sa_url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return True
    modes = sa_url.query.get("mode", ())
    return "memory" in ((modes,) if isinstance(modes, str) else modes) or "mode=memory" in database


def _path_error(what: str, exc: OSError) -> ConfigError:
    """A file-system failure on the database's path, as a configuration error.

    A directory that cannot be created or written is a deployment mistake (a read-only
    container filesystem, a systemd service without its StateDirectory): the user fixes
    the path or its permissions, so it is reported like a bad setting.
    """
    return ConfigError(f"SMSPARTNER_DATABASE_URL: {what}: {exc.strerror or exc}")


def _make_directory(path: Path) -> None:
    """Create the directory of a SQLite file (and its parents) if missing.

    Raises:
        ConfigError: it cannot be created (no permission, read-only, a file in the way).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # exc.filename is the component that failed, not always the last one.
        raise _path_error(f"cannot create directory {exc.filename or path.parent}", exc) from None


def _create_file(path: Path) -> None:
    """Create an empty SQLite file if there is none (an empty file is an empty database).

    SQLite would create it on the first connection, but report a directory it cannot
    write in only as "unable to open database file"; creating it here gives the reason.
    An existing file is left alone, even read-only: reading it still works.

    Raises:
        ConfigError: the file does not exist and cannot be created.
    """
    if path.exists():
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # SQLite's mode
    except FileExistsError:
        pass  # created meanwhile by another process: fine
    except OSError as exc:
        raise _path_error(f"cannot create {path.name} in directory {path.parent}", exc) from None


def sqlite_run_lock(url: str) -> int | None:
    """Make sure only one ``run`` writes a SQLite file; None for other databases.

    Holds an exclusive ``flock`` on the database file itself for the life of the
    process (the OS drops it when the process dies, so a crash never leaves a stale
    lock). The file, not a path derived from the URL: a second path to it (a hard link,
    a bind mount, a symlink) reaches the same lock. SQLite locks with POSIX ``fcntl``
    locks, which on Linux are independent of ``flock``; but closing *any* descriptor of
    the file drops the POSIX locks this process holds on it, so the caller closes the
    returned descriptor (:func:`release_run_lock`) only once the engine is disposed.

    Returns:
        The descriptor holding the lock, or None when the database is not SQLite.

    Raises:
        ConfigError: an in-memory database (nothing would be kept, nor shared with the
            other commands), or the directory or the file cannot be created or opened.
        DatabaseBusyError: another daemon holds it.
    """
    if sqlite_in_memory(url):
        raise ConfigError(
            "SMSPARTNER_DATABASE_URL: an in-memory SQLite database cannot be used by `run`: "
            "nothing would be kept, and no other command could see it; give a file "
            "(sqlite:///path/to/file.db) or a postgresql:// URL"
        )
    found = _sqlite_file(url)
    if found is None:
        return None
    path = found.resolve()
    _make_directory(path)
    if not sa.engine.make_url(url).query.get("uri"):  # as create_engine does
        _create_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no write access
    except OSError as exc:
        raise _path_error(f"cannot open {path}", exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # no SQLite connection is open yet: no POSIX lock to lose
        raise DatabaseBusyError(
            f"another smspartner-status run is already using {path} (maybe under another "
            "path: a link or a mount); a SQLite database has one writer: stop it first, "
            "or use PostgreSQL for several replicas"
        ) from None
    return fd


def release_run_lock(fd: int | None) -> None:
    """Drop the lock of :func:`sqlite_run_lock`; call it after the engine is disposed."""
    if fd is not None:
        os.close(fd)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # 16 MiB of page cache per connection (SQLite's default is 2): a 100,000-number
    # poll touches several indexes at once, and the pool holds a few connections.
    cursor.execute("PRAGMA cache_size=-16384")
    cursor.close()


# --- the account's STOP list (revision 0003) ---------------------------------------------

#: Outcomes of one sync of the account's STOP list (``stop_list_syncs.outcome``): a poll's,
#: plus ``truncated`` (an answer read whole but not proven complete: nothing was changed).
SYNC_OUTCOMES = (*POLL_OUTCOMES, "truncated")

#: The account's STOP list as the last complete sync saw it (``GET /stop-sms/list``): every
#: number ever listed, kept after it leaves the list (``removed_at``), so an opt-out made
#: after a tag's 48-hour window, or by hand in the provider's dashboard, is known here.
account_optouts = sa.Table(
    "account_optouts",
    metadata,
    sa.Column("phone_number", sa.String(64), primary_key=True),
    sa.Column("provider_id", sa.BigInteger, nullable=True),
    _utc("listed_at", nullable=True),
    _utc("first_seen_at", nullable=False),
    _utc("removed_at", nullable=True),
)

#: One sync of the account's STOP list, whatever its outcome (BI and ``optouts --account``
#: read the last one; the daemon reads when the last attempt was).
stop_list_syncs = sa.Table(
    "stop_list_syncs",
    metadata,
    _id(),
    _utc("started_at", nullable=False),
    _utc("finished_at", nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    _int("pages", server_default="0"),
    _int("listed", server_default="0"),
    _int("added", server_default="0"),
    _int("removed", server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    sa.CheckConstraint(_in("outcome", SYNC_OUTCOMES), name="outcome"),
    sa.Index(None, "started_at"),
)


#: The BI view ``suppression_list``: one row per number that opted out by any route
#: (answered STOP under a polled tag, or listed on the account's STOP list), with the
#: earliest time known (MIN skips nulls), whether the account's list holds it now, and in
#: how many tags it answered STOP. Revision 0003 creates it from its own copy; a test
#: keeps the two equal, so changing it here takes a new revision.
SUPPRESSION_LIST_SQL = """
SELECT t.phone_number AS phone_number,
       MIN(t.moment) AS first_opted_out_at,
       EXISTS (SELECT 1 FROM account_optouts a
               WHERE a.phone_number = t.phone_number AND a.removed_at IS NULL) AS on_account_list,
       (SELECT COUNT(*) FROM stop_sms_optouts o
        WHERE o.phone_number = t.phone_number) AS stop_tags
FROM (SELECT phone_number, listed_at AS moment FROM account_optouts
      UNION ALL SELECT phone_number, first_seen_at FROM account_optouts
      UNION ALL SELECT phone_number, reported_at FROM stop_sms_optouts
      UNION ALL SELECT phone_number, first_seen_at FROM stop_sms_optouts) t
GROUP BY t.phone_number
"""
