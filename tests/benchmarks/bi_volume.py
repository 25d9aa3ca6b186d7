"""Benchmark: the ``tag_summary`` view at BI volume (20 million numbers by default).

Generates the rows directly in the database — PostgreSQL ``INSERT … SELECT … FROM
generate_series``, SQLite a recursive CTE — in chunks: ``--tags`` completed tags (default
one per 1,000 rows: 20,000 at 20M) sent over the last 365 days, 1,000 numbers each,
a tag's rows stored together as a poll writes them (90 % delivered, 5 % not delivered,
…, 0.5 % STOP). Then times, warm, the median of ``--repeat`` runs over different tags:

  * one tag:       ``SELECT * FROM tag_summary WHERE tag = :t``            (goal ≤ 50 ms)
  * last 30 days:  ``SELECT * FROM tag_summary WHERE sent_at > :since``
  * baseline:      ``SELECT count(*) FROM delivery_statuses WHERE tag = :t``  (by index)

and prints the plans: ``EXPLAIN (ANALYZE, BUFFERS)`` on PostgreSQL, ``EXPLAIN QUERY PLAN``
on SQLite.

PostgreSQL: ``--postgres URL`` (a database it may fill and empty), or by default a
throwaway cluster started with initdb/pg_ctl like the tests' (``tests/conftest.py``:
fsync off, default ``shared_buffers``), removed afterwards.

Run:  .venv/bin/python -m tests.benchmarks.bi_volume [--rows 20000000] [--tags N]
          [--sqlite | --postgres URL] [--repeat 15]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from daemon import migrate
from daemon.db import TAG_COUNTS_FROM_STATUSES_SQL, UtcDateTime, create_engine, sqlite_text

PER_TAG = 1_000
CHUNK = 1_000_000
NOW = datetime.now(UTC).replace(microsecond=0)
SPREAD = timedelta(days=365)

# status by row number mod 200 (out of 200): 90 % delivered, 5 % not delivered, 1 %
# failed, 2 % expired, 1 % waiting, 1 % unknown; stop_sms on row 0 mod 200 (0.5 %).
_STATUS_CASE = """CASE WHEN {m} < 180 THEN 'delivered' WHEN {m} < 190 THEN 'not_delivered'
     WHEN {m} < 192 THEN 'failed' WHEN {m} < 196 THEN 'expired'
     WHEN {m} < 198 THEN 'waiting' ELSE 'unknown' END"""


def tag_name(i: int) -> str:
    return f"bi{i:06d}"


@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    """The given database, or a database on a throwaway cluster (removed afterwards)."""
    if url:
        yield url
        return
    from tests.conftest import _start_cluster

    base = Path(tempfile.mkdtemp(prefix="bi-volume-pg-"))
    base.chmod(0o755)
    server = _start_cluster(base)
    try:
        admin = sa.create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE bi_volume"))
        admin.dispose()
        yield server.url("bi_volume")
    finally:
        server.ctl("-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


def generate(engine: Engine, rows: int, tags: int) -> float:
    """Fill tracked_tags, delivery_statuses and tag_counts; returns the seconds it took."""
    per = rows // tags
    start = time.perf_counter()
    with engine.begin() as conn:
        sent = [NOW - SPREAD * i / tags for i in range(tags)]
        conn.execute(
            sa.text(
                "INSERT INTO tracked_tags (tag, sent_at, window_ends_at, state, "
                "last_polled_at, created_at, updated_at) VALUES (:tag, :sent, :ends, "
                "'completed', :ends, :sent, :ends)"
            ).bindparams(
                sa.bindparam("sent", type_=UtcDateTime()),
                sa.bindparam("ends", type_=UtcDateTime()),
            ),
            [
                {"tag": tag_name(i), "sent": s, "ends": s + timedelta(hours=48)}
                for i, s in enumerate(sent)
            ],
        )
    pg = engine.dialect.name == "postgresql"
    for lo in range(0, per * tags, CHUNK):
        hi = min(lo + CHUNK, per * tags)
        with engine.begin() as conn:
            (_fill_postgres if pg else _fill_sqlite)(conn, lo, hi, per)
        print(f"  … {hi:,} rows ({time.perf_counter() - start:.0f} s)", flush=True)
    with engine.begin() as conn:  # the counts each tag's polls would have kept
        conn.execute(
            sa.text(TAG_COUNTS_FROM_STATUSES_SQL).bindparams(
                sa.bindparam("now", NOW, type_=UtcDateTime())
            )
        )
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("VACUUM ANALYZE" if pg else "ANALYZE")
    return time.perf_counter() - start


def _fill_postgres(conn: Connection, lo: int, hi: int, per: int) -> None:
    # Loading only: skip the per-row foreign-key trigger (the tags were inserted above).
    conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    conn.exec_driver_sql(
        f"""
        INSERT INTO delivery_statuses (tag, phone_number, status, provider_status,
            stop_sms, reported_at, first_seen_at, resolved_at, updated_at)
        SELECT 'bi' || lpad((g / {per})::text, 6, '0'), '+336' || lpad(g::text, 9, '0'),
               {_STATUS_CASE.format(m="mod(g, 200)")}, 'Delivered', mod(g, 200) = 0,
               now(), now(), now(), now()
        FROM generate_series({lo}, {hi - 1}) AS g
        """
    )


def _fill_sqlite(conn: Connection, lo: int, hi: int, per: int) -> None:
    stamp = sqlite_text(NOW)
    conn.exec_driver_sql(
        f"""
        INSERT INTO delivery_statuses (tag, phone_number, status, provider_status,
            stop_sms, reported_at, first_seen_at, resolved_at, updated_at)
        WITH RECURSIVE g(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM g WHERE i < {hi - 1})
        SELECT printf('bi%06d', i / {per}), printf('+336%09d', i),
               {_STATUS_CASE.format(m="(i % 200)")}, 'Delivered', i % 200 = 0,
               '{stamp}', '{stamp}', '{stamp}', '{stamp}'
        FROM g
        """
    )


def _query(sql: str) -> Any:
    query = sa.text(sql)
    if ":since" in sql:  # a timestamp in each engine's column format
        query = query.bindparams(sa.bindparam("since", type_=UtcDateTime()))
    return query


def timed(conn: Connection, sql: str, params: list[dict[str, Any]]) -> tuple[float, int]:
    """Median seconds of running ``sql`` once per params (after a warm-up), and rows."""
    query = _query(sql)
    for p in params[:3]:
        conn.execute(query, p).all()
    times, found = [], 0
    for p in params:
        start = time.perf_counter()
        found = len(conn.execute(query, p).all())
        times.append(time.perf_counter() - start)
    return statistics.median(times), found


def plan(conn: Connection, sql: str, params: dict[str, Any]) -> str:
    prefix = (
        "EXPLAIN (ANALYZE, BUFFERS) "
        if conn.dialect.name == "postgresql"
        else "EXPLAIN QUERY PLAN "
    )
    rows = conn.execute(_query(prefix + sql), params).all()
    if conn.dialect.name == "postgresql":
        return "\n".join(f"    {r[0]}" for r in rows)
    return "\n".join(f"    {'  ' * (r[1] != 0)}{r[-1]}" for r in rows)


def run(url: str, rows: int, tags: int, repeat: int, label: str) -> None:
    engine = create_engine(url)
    migrate.upgrade(engine)
    print(f"generating {rows:,} numbers over {tags:,} tags in {label} …", flush=True)
    took = generate(engine, rows, tags)
    rng = random.Random(1)
    one_tag = [{"t": tag_name(rng.randrange(tags))} for _ in range(repeat)]
    since = [{"since": NOW - timedelta(days=30)} for _ in range(max(3, repeat // 3))]
    q_tag = "SELECT * FROM tag_summary WHERE tag = :t"
    q_month = "SELECT * FROM tag_summary WHERE sent_at > :since"
    q_base = "SELECT count(*) FROM delivery_statuses WHERE tag = :t"
    with engine.connect() as conn:
        size = _size(conn)
        base, _ = timed(conn, q_base, one_tag)
        tag_s, _ = timed(conn, q_tag, one_tag)
        month_s, month_rows = timed(conn, q_month, since)
        plans = [(q, plan(conn, q, p[0])) for q, p in ((q_tag, one_tag), (q_month, since))]
    engine.dispose()

    print(f"\n{label}: {rows:,} numbers, {tags:,} tags ({rows // tags:,} each), {size}")
    print(f"  generated in {took:.0f} s")
    print(f"  baseline count(*) of one tag's rows (index): {_ms(base)}")
    print(f"  tag_summary WHERE tag = :t:                  {_ms(tag_s)}  (goal <= 50 ms)")
    print(f"  tag_summary WHERE sent_at > now - 30 days:   {_ms(month_s)}  ({month_rows} tags)")
    for query, text in plans:
        print(f"\n  plan of {query}:\n{text}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def _size(conn: Connection) -> str:
    if conn.dialect.name == "postgresql":
        value = conn.exec_driver_sql(
            "SELECT pg_size_pretty(pg_total_relation_size('delivery_statuses'))"
        ).scalar()
        return f"delivery_statuses with indexes {value}"
    pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
    page_size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 0
    return f"database file {pages * page_size / 2**20:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--tags", type=int, help=f"default: rows / {PER_TAG:,}")
    parser.add_argument("--repeat", type=int, default=15)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--sqlite", action="store_true", help="a SQLite file instead")
    where.add_argument("--postgres", metavar="URL", help="this (disposable) database")
    args = parser.parse_args()
    tags = args.tags or max(1, args.rows // PER_TAG)

    if args.sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            run(f"sqlite:///{tmp}/bi.db", args.rows, tags, args.repeat, "SQLite")
        return
    with postgres(args.postgres) as url:
        if args.postgres:
            _empty(url)
        run(url, args.rows, tags, args.repeat, "PostgreSQL")


def _empty(url: str) -> None:
    engine = create_engine(url)
    migrate.downgrade(engine)
    engine.dispose()


if __name__ == "__main__":
    main()
