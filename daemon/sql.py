"""SQL handed straight to the driver, for the statements every poll runs.

SQLAlchemy Core's statement building and per-row parameter processing outweighed the
database's own work, on many small tags and on one large one alike (figures in
docs/performance.md). So the fixed statements are compiled once per dialect
(:func:`compiled`) and run with the driver's own parameters (:func:`execute`); bulk
rows go 100 to a statement on SQLite (:func:`bulk`) and by COPY on PostgreSQL
(:func:`copy_rows`). Values handed over must already be in the driver's form:
:func:`db_time` converts datetimes.

:mod:`daemon.store` and :mod:`daemon.tracking` build their statements with these.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from daemon.db import sqlite_parse, sqlite_text


def dialect_insert(conn: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (both engines spell it the same).

    The dialect's module is imported here, not at the top: SQLite commands need not pay
    for the PostgreSQL dialect's import, nor PostgreSQL ones for SQLite's.
    """
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def copy_rows(conn: Connection, table: str, keys: Sequence[str], values: list[Any]) -> None:
    """PostgreSQL: COPY rows into ``table``; ``values`` as :func:`bulk` takes them."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(f"COPY {table} ({', '.join(keys)}) FROM STDIN") as cp:
            for row in zip(*[iter(values)] * len(keys), strict=True):  # a tuple at a time
                cp.write_row(row)
    finally:
        cursor.close()


_COMPILED: dict[tuple[Any, ...], Any] = {}


def compiled(conn: Connection, name: str, build: Callable[[], Any]) -> Any:
    """``build()`` compiled for the connection's dialect, once per process and dialect.

    SQL handed to the driver directly skips SQLAlchemy's compiled cache, and building
    the forward-only upsert anew costs a small tag's poll more than its database work.
    """
    dialect = conn.dialect
    key = (name, type(dialect), dialect.paramstyle, dialect.server_version_info)
    found = _COMPILED.get(key)
    if found is None:
        found = _COMPILED[key] = build().compile(dialect=dialect)
    return found


#: Rows per statement for SQLite's bulk writes: 9 columns × 100 rows stays under the
#: 999 bound values that older SQLite builds allow.
SQLITE_ROWS_PER_STATEMENT = 100


def bulk(
    conn: Connection,
    name: str,
    build: Callable[[list[dict[str, Any]]], Any],
    keys: Sequence[str],
    values: list[Any],
) -> None:
    """SQLite: run ``build(values)`` (an INSERT taking ``.values(values)``) for many
    rows, given as one flat list of their values, row after row in ``keys`` order.

    The rows go 100 to a statement, since a statement per row re-opens the table's and
    its indexes' cursors each time. The values skip SQLAlchemy's processors, so they must
    already be in the driver's form (see ``db_time``); they come flat, since a tuple per
    row is costly to build and to keep alive on a large poll. PostgreSQL COPYs instead
    (:func:`copy_rows`).
    """
    width = len(keys)
    step = SQLITE_ROWS_PER_STATEMENT * width
    whole = len(values) - len(values) % step
    if whole:
        batches = [tuple(values[i : i + step]) for i in range(0, whole, step)]
        _run_values(conn, name, build, keys, SQLITE_ROWS_PER_STATEMENT, batches)
    if whole < len(values):
        rest = [tuple(values[i : i + width]) for i in range(whole, len(values), width)]
        _run_values(conn, name, build, keys, 1, rest)


def _run_values(
    conn: Connection,
    name: str,
    build: Callable[[list[dict[str, Any]]], Any],
    keys: Sequence[str],
    per: int,
    params: list[tuple[Any, ...]],
) -> None:
    """Execute ``build`` with ``per`` rows of VALUES, once per tuple of ``params``."""
    text, order = _values_sql(conn, name, build, keys, per)
    if order is not None:  # placeholders in another order than ``keys``
        get = operator.itemgetter(*order)
        params = [get(row) for row in params]
    conn.exec_driver_sql(text, params)


_VALUES_SQL: dict[tuple[Any, ...], tuple[str, list[int] | None]] = {}


def _values_sql(
    conn: Connection,
    name: str,
    build: Callable[[list[dict[str, Any]]], Any],
    keys: Sequence[str],
    per: int,
) -> tuple[str, list[int] | None]:
    """The SQL of ``build`` with ``per`` rows of VALUES, and the index in a flat row
    tuple of each placeholder's value (None: they follow ``keys`` already).

    Compiled for one row, then its ``(?, …)`` group repeated as text: SQLAlchemy
    compiling 900 parameters cost more than a small poll's own work, and its garbage set
    the collector scanning a large poll's rows (figures in docs/performance.md).
    """
    dialect = conn.dialect
    cache_key = (name, per, type(dialect), dialect.paramstyle, dialect.server_version_info)
    found = _VALUES_SQL.get(cache_key)
    if found is not None:
        return found
    width = len(keys)
    # Where a placeholder's value sits in a flat tuple of rows, by its name.
    index = {f"{key}_{i}": i * width + j for i in range(per) for j, key in enumerate(keys)}

    def rows(n: int) -> Any:
        return build([{key: sa.bindparam(f"{key}_{i}") for key in keys} for i in range(n)])

    one = compiled(conn, f"{name}/1", lambda: rows(1))
    group = "(" + ", ".join(["?"] * width) + ")"
    head, values, tail = str(one).partition(f" VALUES {group}")
    first_row = list(one.positiontup or ())
    if values and group not in tail and sorted(first_row) == sorted(f"{k}_0" for k in keys):
        text = head + " VALUES " + ", ".join([group] * per) + tail
        order = [i * width + index[n] for i in range(per) for n in first_row]
    else:  # not the shape foreseen: SQLAlchemy compiles all the rows
        statement = compiled(conn, f"{name}/{per}", lambda: rows(per))
        text, order = str(statement), [index[n] for n in statement.positiontup]
    in_order = order == list(range(len(order)))
    found = _VALUES_SQL[cache_key] = (text, None if in_order else order)
    return found


def execute(conn: Connection, name: str, build: Callable[[], Any], **params: Any) -> Any:
    """Run a fixed statement with named bind parameters through the driver.

    For the statements every poll runs, where SQLAlchemy's statement building, cache-key
    generation and parameter processing would be most of the daemon's own work on small
    tags. Datetimes are converted here (the only bound type that needs it); rows come
    back in the driver's form.
    """
    statement = compiled(conn, name, build)
    to_db = db_time(conn)
    values = statement.params  # the constants the statement binds, e.g. "+ 1"
    values.update((k, to_db(v) if isinstance(v, datetime) else v) for k, v in params.items())
    if statement.positiontup is not None:  # "?" placeholders
        return conn.exec_driver_sql(str(statement), tuple(values[k] for k in statement.positiontup))
    return conn.exec_driver_sql(str(statement), values)


def from_db_time(conn: Connection) -> Callable[[Any], datetime | None]:
    """The inverse of :func:`db_time`: the driver's value → aware UTC datetime."""
    if conn.dialect.name == "sqlite":
        return sqlite_parse
    return lambda v: None if v is None else v.astimezone(UTC)


def db_time(conn: Connection) -> Any:
    """Datetime → the driver's form: ISO text on SQLite, the datetime itself elsewhere."""
    if conn.dialect.name == "sqlite":
        return lambda v: None if v is None else sqlite_text(v)
    return lambda v: v
