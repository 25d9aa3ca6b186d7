"""Benchmark: the status page (``GET /``, ``GET /ui/tags/{tag}``) over 10,000 tags.

Fills a database with ``--tags`` tracked tags (default 10,000) sent over the last 30
days, each with its ``tag_counts`` row and ``--polls`` polls in ``poll_runs`` (default
10: 100,000 rows), plus one tag of ``--numbers`` numbers (default 100,000) whose
``resolved_at`` spread over 48 hours, for the delivery curve. Then serves it with the
daemon's own :class:`~daemon.http.HttpServer` on loopback and times, warm, ``--repeat``
requests of each (median and 95th percentile, client side, answer read in full):

  * baseline: ``GET /healthz`` (a round trip that reads nothing) and ``GET /tags?limit=100``
    (the JSON listing of as many tags as a status page shows);
  * ``GET /`` (the first page), ``GET /?page=50`` and the last page;
  * rendering alone: :func:`daemon.ui.render_index` of one page, in process;
  * ``GET /ui/tags/big`` (the tag with ``--numbers`` numbers), whose delivery curve is
    one pass over the tag's final numbers, next to its baseline: counting those numbers
    by the (tag, status) index, in process.

Goal (issue 21): a page over 10,000 tags in under 200 ms. Exits 1 when the 95th
percentile of a ``GET /`` page is over it. A tag's own page grows with its numbers
(one read of each, grouped per minute in SQL); it is reported, not held to the goal.

Run:  .venv/bin/python -m tests.benchmarks.status_page_10k [--tags 10000] [--polls 10]
          [--numbers 100000] [--repeat 30] [--postgres [URL]]

``--postgres`` alone starts a throwaway PostgreSQL cluster as ``bi_volume`` does;
with a URL it fills that (empty) database.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from daemon import migrate, queries, ui
from daemon.db import create_engine, delivery_statuses, poll_runs, tag_counts, tracked_tags
from daemon.health import Health
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.settings import load_settings
from tests.benchmarks.bi_volume import postgres

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
GOAL_MS = 200.0
BATCH = 5_000
BIG = "big"


def _insert(engine: Engine, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for start in range(0, len(rows), BATCH):
            conn.execute(table.insert(), rows[start : start + BATCH])


def fill(engine: Engine, tags: int, polls: int, numbers: int) -> None:
    """The tags, their counts and polls, and the big tag's numbers."""
    names = [BIG] + [f"t{i:05d}" for i in range(tags - 1)]
    tracked, counts, runs = [], [], []
    for i, tag in enumerate(names):
        sent = NOW - timedelta(minutes=5 + i * 30 * 24 * 60 / tags)
        total = numbers if tag == BIG else 200 + i % 800
        state = "active" if sent > NOW - timedelta(hours=48) else "completed"
        tracked.append(
            dict(
                tag=tag,
                sent_at=sent,
                window_ends_at=sent + timedelta(hours=48),
                state=state,
                next_poll_at=NOW + timedelta(minutes=i % 60) if state == "active" else None,
                last_polled_at=NOW - timedelta(minutes=i % 60),
                poll_count=polls,
            )
        )
        delivered = total * 9 // 10
        counts.append(
            dict(
                tag=tag,
                total=total,
                delivered=delivered,
                not_delivered=total // 20,
                failed=total // 100,
                waiting=total - delivered - total // 20 - total // 100,
                expired=0,
                unknown=0,
                stop_sms=total // 200,
                updated_at=NOW,
            )
        )
        for p in range(polls):
            started = NOW - timedelta(minutes=(i % 60) + 60 * p)
            runs.append(
                dict(
                    tag=tag,
                    started_at=started,
                    finished_at=started + timedelta(seconds=1),
                    outcome="ok" if (i + p) % 50 else "transient_error",
                    pages=1,
                    numbers_seen=total,
                    numbers_changed=0,
                    error=None if (i + p) % 50 else "HTTP 503 from the provider",
                )
            )
    _insert(engine, tracked_tags, tracked)
    _insert(engine, tag_counts, counts)
    runs.sort(key=lambda r: r["started_at"])  # ids in time order, as the daemon writes them
    _insert(engine, poll_runs, runs)
    big_sent = tracked[0]["sent_at"]
    statuses = []
    for n in range(numbers):
        # Most within a minute, a tail over 48 hours, 5 % never resolved.
        if n % 20 == 0:
            status, resolved = "waiting", None
        else:
            status = "delivered" if n % 10 else "not_delivered"
            resolved = big_sent + timedelta(seconds=(n % 97) if n % 5 else (n * 37) % 172_800)
        statuses.append(
            dict(
                tag=BIG,
                phone_number=f"+336{n:08d}",
                status=status,
                stop_sms=False,
                first_seen_at=big_sent,
                resolved_at=resolved,
                updated_at=NOW,
            )
        )
    _insert(engine, delivery_statuses, statuses)


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and 95th percentile, in ms, of ``repeat`` warm calls."""
    call()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.95))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--polls", type=int, default=10)
    parser.add_argument("--numbers", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument(
        "--postgres",
        nargs="?",
        const="",
        metavar="URL",
        help="PostgreSQL: an empty database, or a throwaway cluster when no URL is given",
    )
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        if args.postgres is None:
            url = f"sqlite:///{Path(tmp) / 'status.db'}"
        else:
            url = stack.enter_context(postgres(args.postgres or None))
        engine = create_engine(url)
        migrate.upgrade(engine)
        start = time.perf_counter()
        fill(engine, args.tags, args.polls, args.numbers)
        print(
            f"filled {args.tags:,} tags, {args.tags * args.polls:,} polls, "
            f"{args.numbers:,} numbers in {time.perf_counter() - start:.1f} s "
            f"({engine.dialect.name})"
        )
        if engine.dialect.name == "postgresql":
            # What autovacuum does soon after a bulk load: without statistics, the planner
            # reads poll_runs for "the last hour" in ~85 ms instead of ~5 ms.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
        health = Health(lambda: NOW)
        health.beat()
        server = HttpServer(
            host="127.0.0.1",
            port=0,
            engine=engine,
            health=health,
            metrics=Metrics(),
            settings=load_settings({}, database_url=url, http_port=0),
            clock=lambda: NOW,
            wake=lambda: None,
            owner="bench:1:0",
        )
        server.start()
        last_page = -(-args.tags // ui.PAGE_SIZE)
        results: dict[str, tuple[float, float]] = {}
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:

                def get(path: str) -> Callable[[], object]:
                    def call() -> object:
                        response = client.get(path)
                        assert response.status_code == 200, (path, response.status_code)
                        return response.content

                    return call

                for name, path in [
                    ("baseline GET /healthz", "/healthz"),
                    ("baseline GET /tags?limit=100", "/tags?limit=100"),
                    ("GET /", "/"),
                    ("GET /?page=50", "/?page=50"),
                    (f"GET /?page={last_page} (last)", f"/?page={last_page}"),
                    (f"GET /ui/tags/{BIG} ({args.numbers:,} numbers)", f"/ui/tags/{BIG}"),
                ]:
                    results[name] = timed(get(path), args.repeat)
            with engine.connect() as conn:
                rows = queries.newest_tags_page(conn, offset=0, limit=ui.PAGE_SIZE)
                final = sa.select(sa.func.count()).where(
                    delivery_statuses.c.tag == BIG,
                    delivery_statuses.c.status.in_(queries.FINAL_STATUSES),
                )
                results["baseline: count the big tag's final numbers"] = timed(
                    lambda: conn.scalar(final), args.repeat
                )
            view = ui.DaemonView(
                now=NOW,
                owner="bench:1:0",
                started_at=NOW,
                last_beat=NOW,
                problems=[],
                auth_error=None,
                polls={"ok": 100},
            )
            results["render_index alone (100 rows)"] = timed(
                lambda: ui.render_index(view, rows, page=1, total_tags=args.tags), args.repeat
            )
        finally:
            server.stop()
            engine.dispose()

    print(f"{'':44} {'median':>9} {'p95':>9}")
    for name, (median, p95) in results.items():
        print(f"{name:44} {median:7.1f} ms {p95:7.1f} ms")
    pages = [name for name in results if name.startswith("GET /") and "/ui/" not in name]
    slow = [name for name in pages if results[name][1] > GOAL_MS]
    if slow:
        print(f"over the {GOAL_MS:.0f} ms goal: {', '.join(slow)}")
        sys.exit(1)
    print(f"every GET / page under the {GOAL_MS:.0f} ms goal (95th percentile)")


if __name__ == "__main__":
    main()
