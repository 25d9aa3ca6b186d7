"""Benchmark: ``prune`` over 20 million event rows while the daemon keeps polling.

Builds a database whose ``delivery_status_events`` holds ``--rows`` rows generated in
SQL (19 in 20 observed 100 days ago, the rest today), then runs
``smspartner-status prune --events-older-than 90d`` as a child process — as a user or a
cron job would — while this process polls a 1,000-number tag back to back, each poll
changing every number (1,000 upserts and 1,000 events: a write that needs the lock).

Compared in the same run: the polls before the prune starts (baseline) and the polls
during it. Goal (issue): no poll is held up by the prune for more than 1 s, i.e. the
slowest poll during the prune is at most the baseline median + 1 s.

Run:  .venv/bin/python -m tests.benchmarks.prune_20m [--rows 20000000]
          [--postgres [URL]]   (no URL: a throwaway cluster, as bi_volume starts one)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from daemon import migrate, store, tracking
from daemon.app import App
from daemon.db import create_engine, sqlite_text
from daemon.log import configure_logging
from daemon.settings import load_settings
from daemon.simulator import Simulator
from tests.benchmarks.bi_volume import postgres

KEY = "bench-key"
TAG = "live"
NUMBERS = 1000
CHUNK = 1_000_000


def generate(engine: sa.Engine, rows: int, old: datetime, recent: datetime) -> None:
    """``rows`` events, in chunks so progress shows; 1 row in 20 is recent."""
    postgres = engine.dialect.name == "postgresql"
    if postgres:
        series = "generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint) - 1) AS c(x)"
        params = {"old": old, "recent": recent}
    else:
        series = (
            "(WITH RECURSIVE c(x) AS (SELECT :lo UNION ALL SELECT x + 1 FROM c WHERE x + 1 < :hi) "
            "SELECT x FROM c)"
        )
        params = {"old": sqlite_text(old), "recent": sqlite_text(recent)}
    sql = sa.text(
        "INSERT INTO delivery_status_events "
        "(tag, phone_number, old_status, new_status, reported_at, observed_at) "
        f"SELECT 'old' || (x / 10000), '+33' || (600000000 + x), 'waiting', 'delivered', "
        f":old, CASE WHEN x % 20 = 0 THEN :recent ELSE :old END FROM {series}"
    )
    start = time.perf_counter()
    for lo in range(0, rows, CHUNK):
        with engine.begin() as conn:
            conn.execute(sql, {**params, "lo": lo, "hi": min(lo + CHUNK, rows)})
        print(
            f"  generated {min(lo + CHUNK, rows):,} events ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    if postgres:
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE delivery_status_events"))
            conn.commit()


def items(k: int, sent: datetime) -> list[dict[str, object]]:
    """Poll ``k``: every number final, alternating status, a date later than poll k-1's."""
    status = "Delivered" if k % 2 else "Not delivered"
    date = str(int((sent + timedelta(seconds=60 + k)).timestamp()))
    return [
        {"phoneNumber": f"+3361{n:07d}", "status": status, "stopSMS": False, "date": date}
        for n in range(NUMBERS)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument(
        "--postgres",
        metavar="URL",
        nargs="?",
        const="",
        help="PostgreSQL instead: this disposable database, or a throwaway cluster",
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    if args.postgres is None:
        with tempfile.TemporaryDirectory() as tmp:
            run(f"sqlite:///{Path(tmp) / 'prune.db'}", args.rows, fresh=True)
    else:
        with postgres(args.postgres or None) as url:
            run(url, args.rows, fresh=not args.postgres)


class Phases:
    """Where a poll's time went: timing wrappers around the poller's steps."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def wrap(self, owner: object, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[label] = time.perf_counter() - start

        setattr(owner, name, timed)


def run(url: str, rows: int, *, fresh: bool) -> None:
    """Fill the database, poll, prune while polling, print the figures."""
    engine = create_engine(url)
    if not fresh:
        migrate.downgrade(engine)
    migrate.upgrade(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    sent = now - timedelta(hours=1)
    print(f"{rows:,} events into {engine.dialect.name}:", flush=True)
    generate(engine, rows, now - timedelta(days=100), now - timedelta(hours=2))
    with engine.begin() as conn:
        tracking.track(conn, TAG, sent_at=sent, window_ends_at=sent + timedelta(hours=48), now=now)
    with Simulator(api_key=KEY, page_size=1000) as sim:
        settings = load_settings(
            {},
            api_key=KEY,
            base_url=sim.url,
            database_url=url,
            rate_limit_per_second=0,
            http_timeout_seconds=30,
        )
        app = App(settings)
        client, poller = app.client, app.poller
        k = 0
        phases = Phases()
        phases.wrap(client, "fetch_tag", "fetch")
        phases.wrap(tracking, "lock_tag", "lock (waits for the write lock)")
        phases.wrap(store, "apply_reports", "upsert + events")
        slow: list[str] = []

        def poll() -> float:
            nonlocal k
            k += 1
            sim.set_items(TAG, items(k, sent))
            phases.current = {}
            start = time.perf_counter()
            result = poller.poll(TAG)
            took = time.perf_counter() - start
            assert result.ok and result.changed == NUMBERS, result
            if took > 0.5:
                known = sum(phases.current.values())
                parts = {**phases.current, "rest (commit, run row, tag row)": took - known}
                slow.append(
                    f"    {took * 1000:.0f} ms at {time.strftime('%H:%M:%S')}: "
                    + ", ".join(f"{name} {t * 1000:.0f}" for name, t in parts.items())
                )
            return took

        baseline = [poll() for _ in range(20)]
        env = {
            **os.environ,
            "SMSPARTNER_DATABASE_URL": url,
            "SMSPARTNER_API_KEY": KEY,
            "SMSPARTNER_LOG_LEVEL": "warning",
        }
        started = time.perf_counter()
        prune = subprocess.Popen(
            [sys.executable, "-m", "daemon", "prune", "--events-older-than", "90d"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        during = []
        while prune.poll() is None:
            during.append(poll())
        pruned_in = time.perf_counter() - started
        output = prune.stdout.read() if prune.stdout else ""
    assert prune.returncode == 0, output
    with engine.connect() as conn:
        total = conn.scalar(sa.text("SELECT count(*) FROM delivery_status_events"))
    app.close()
    engine.dispose()

    base = statistics.median(baseline)
    worst = max(during) if during else 0.0
    print(f"prune --events-older-than 90d over {rows:,} events ({engine.dialect.name})")
    print(f"  prune: {pruned_in:.1f} s; {output.strip().splitlines()[-1]}; {total:,} events left")
    print(f"  baseline poll (1,000 numbers changed), before the prune: median {base * 1000:.0f} ms")
    print(
        f"  {len(during)} polls during the prune: median {statistics.median(during) * 1000:.0f} ms,"
        f" slowest {worst * 1000:.0f} ms; over 1 s: {sum(t > 1 for t in during)}, over 0.5 s: "
        f"{sum(t > 0.5 for t in during)}"
    )
    print(
        f"  longest hold-up of a poll by the prune: {max(0.0, worst - base) * 1000:.0f} ms "
        "(goal <= 1000 ms)"
    )
    if slow:
        print("  polls over 0.5 s, where the time went (ms):", *slow, sep="\n")


if __name__ == "__main__":
    main()
