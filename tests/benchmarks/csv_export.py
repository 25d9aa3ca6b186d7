"""Benchmark: peak memory of ``report TAG --numbers --csv`` (issue 20: < 100 MB at 100,000).

For each size (``--rows``, default 100,000 and 1,000,000) a tag of that many numbers is
generated in the database (``tests.helpers.fill_numbers``), then each command below runs
as a whole process, its stdout read (and its lines counted) by this one, and its peak
resident set size taken from ``wait4`` (``ru_maxrss`` of that child alone, through a
small launcher: see ``tests.helpers.peak_rss``):

  * baseline ``report TAG``: the same verb, the same imports and database, no numbers;
  * floor, a bare Python + driver CSV writer (sqlite3, or psycopg with a named cursor):
    the least a streamed export can cost, with nothing of ours imported;
  * ``report TAG --numbers --csv``: the subject;
  * ``report TAG --numbers --json``: the listing that loads every number first, for
    contrast, up to 100,000 numbers (``--no-json`` skips it; at 1,000,000 it would take
    GBs).

The export's growth over the baseline is what streaming is about: it should not grow
with the number of rows.

SQLite always; PostgreSQL with ``--postgres [URL]`` (no URL: a throwaway cluster, as
``bi_volume`` starts one; a URL: a database it may fill).

Run:  .venv/bin/python -m tests.benchmarks.csv_export [--rows 100000 1000000]
          [--postgres [URL]] [--no-json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from daemon import migrate
from daemon.db import create_engine, tracked_tags
from tests.benchmarks.bi_volume import postgres
from tests.helpers import fill_numbers, peak_rss

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
#: The --json contrast runs up to this size only: at 1,000,000 it would take GBs.
JSON_MAX_ROWS = 100_000
COLUMNS = "phone_number, status, provider_status, stop_sms, reported_at, resolved_at"

#: The floor: the same rows, in the same order, through csv.writer, nothing else.
FLOOR_SQLITE = f"""
import csv, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
writer = csv.writer(sys.stdout)
writer.writerow("{COLUMNS}".split(", "))
for row in conn.execute(
    "SELECT {COLUMNS} FROM delivery_statuses WHERE tag = ? ORDER BY phone_number",
    (sys.argv[2],),
):
    writer.writerow(row)
"""
FLOOR_POSTGRES = f"""
import csv, psycopg, sys
with psycopg.connect(sys.argv[1]) as conn, conn.cursor(name="export") as cur:
    cur.itersize = 1000
    writer = csv.writer(sys.stdout)
    writer.writerow("{COLUMNS}".split(", "))
    cur.execute(
        "SELECT {COLUMNS} FROM delivery_statuses WHERE tag = %s ORDER BY phone_number",
        (sys.argv[2],),
    )
    for row in cur:
        writer.writerow(row)
"""


def prepare(url: str, sizes: list[int]) -> None:
    """Migrate ``url`` and write one tag ``nROWS`` per size (unless already there)."""
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
        for rows in sizes:
            tag = f"n{rows}"
            with engine.begin() as conn:
                exists = conn.scalar(sa.select(tracked_tags.c.tag).where(tracked_tags.c.tag == tag))
                if exists:
                    continue
                started = time.monotonic()
                conn.execute(
                    sa.insert(tracked_tags),
                    {"tag": tag, "sent_at": NOW, "window_ends_at": NOW + timedelta(hours=48)},
                )
                fill_numbers(conn, tag, rows, NOW)
            print(f"  wrote {rows:,} numbers in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        engine.dispose()


def run_engine(name: str, url: str, floor: list[str], args: argparse.Namespace) -> None:
    """Measure every command at every size on one database, and print a table."""
    print(f"\n{name}: preparing", flush=True)
    prepare(url, args.rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")}
    env.update(SMSPARTNER_DATABASE_URL=url, SMSPARTNER_LOG_FORMAT="json")
    cli = [sys.executable, "-m", "daemon", "report"]
    print(f"\n{name}\n")
    print("| numbers | command | peak RSS | over baseline | wall | lines out |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for rows in args.rows:
        tag = f"n{rows}"
        runs = [
            ("launcher alone (`/bin/true`)", ["/bin/true"]),
            ("baseline `report TAG`", [*cli, tag]),
            ("floor: bare Python + driver csv.writer", [*floor, tag]),
            ("`report TAG --numbers --csv`", [*cli, tag, "--numbers", "--csv"]),
        ]
        if not args.no_json and rows <= JSON_MAX_ROWS:
            runs.append(
                ("`report TAG --numbers --json` (not streamed)", [*cli, tag, "--numbers", "--json"])
            )
        base: float | None = None
        for what, argv in runs:
            m = peak_rss(argv, env)
            base = m.rss_mb if base is None and "baseline" in what else base
            if "--csv" in argv:
                assert m.lines == rows + 1, f"{m.lines} lines for {rows} numbers"
            over = m.rss_mb - (base or m.rss_mb)
            print(
                f"| {rows:,} | {what} | {m.rss_mb:.1f} MB | {over:+.1f} MB "
                f"| {m.seconds:.2f} s | {m.lines:,} |",
                flush=True,
            )


@contextmanager
def sqlite_file() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="csv-export-") as tmp:
        yield str(Path(tmp) / "export.db")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--postgres",
        nargs="?",
        const="",
        metavar="URL",
        help="also on PostgreSQL: this database, or (no URL) a throwaway cluster",
    )
    parser.add_argument("--no-json", action="store_true", help="skip the --json contrast")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, sizes {args.rows}, load {os.getloadavg()[0]:.2f}")
    with sqlite_file() as path:
        floor = [sys.executable, "-c", FLOOR_SQLITE, path]
        run_engine("SQLite", f"sqlite:///{path}", floor, args)
    if args.postgres is not None:
        with postgres(args.postgres or None) as url:
            url = url.replace("+psycopg", "")
            floor = [sys.executable, "-c", FLOOR_POSTGRES, url]
            run_engine("PostgreSQL", url, floor, args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
