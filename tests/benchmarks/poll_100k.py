"""Benchmark: the first poll of a 100,000-number tag into SQLite (or PostgreSQL).

A fast static server on loopback (tests/benchmarks/pageserver.py: pages rendered once,
in a child process) serves the tag in 100 pages of 1,000. Against it, in the same run:

**Whole commands, process start included (the headline; SQLite).** Alternating rounds of
  * the bare script: a separate ``python -c`` process that fetches every page with
    urllib, ``json.loads`` each, and upserts the rows with one sqlite3 ``executemany``
    into a fresh file (with the daemon's GC threshold, which it would gain as much from);
  * ``smspartner-status track TAG`` then ``smspartner-status poll TAG`` into a fresh
    SQLite file (``SMSPARTNER_RATE_LIMIT_PER_SECOND=0``: unpaced, like the script); the
    poll is the one compared, track is reported apart.
  Goal (issue 18): the poll within 2× the bare script, never more than 3×.

**In process, for where the time goes** (``--no-in-process`` skips them):
  * baseline: fetch the pages with httpx, ``json.loads``, one ``executemany`` upsert with
    the bare driver (sqlite3, or psycopg for PostgreSQL); measured before and after the
    first poll, and averaged;
  * first poll: the daemon's full poll (client, merge, diff, forward-only upsert with
    events, poll_runs, lifecycle) into an empty database;
  * re-poll: the same tag after 1 % of the numbers changed, by the same poller, as the
    daemon re-polls (it remembers the tag's last answer: daemon/answers.py);
  * cold re-poll, for information: the same re-poll by a new poller (a new process,
    another replica), which compares every number with what is stored;
  * SQLite only, the contract's floor: the same two polls with the bare driver into the
    daemon's own schema (plain INSERT of the 9-column rows, 100 to a statement as the
    daemon sends them, first-sighting events by
    INSERT … SELECT, then a dict diff and an UPDATE + event per changed number). No
    parsing checks, merge, forward-only rule or bookkeeping: what the schema alone costs,
    so the figures show how much of the gap to the baseline is the daemon's own.
  Goals: first poll ≤ 2× baseline (never > 3×), re-poll ≤ ½ first poll.

The machine may be shared: rounds alternate their order, and ratios are medians of
per-round ratios, each taken between neighbouring measurements.

Run:  .venv/bin/python -m tests.benchmarks.poll_100k [--rounds 3] [--numbers 100000]
      [--no-in-process] [--postgres URL]   (PostgreSQL: the in-process figures only)
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any

import httpx

import daemon
from daemon import migrate, tracking
from daemon.app import App
from daemon.db import create_engine, sqlite_text
from daemon.log import configure_logging
from daemon.poller import GC_THRESHOLD, Poller, tune_gc
from daemon.settings import load_settings
from tests.benchmarks.pageserver import KEY, SENT, TAG, PageServer

#: The bare script: argv is base URL, key, tag, SQLite file; prints the rows stored.
BARE_SCRIPT = f"""
import gc, json, sqlite3, sys, urllib.parse, urllib.request
gc.set_threshold({GC_THRESHOLD}, *gc.get_threshold()[1:])
base, key, tag, path = sys.argv[1:]
rows, page = [], 1
while True:
    query = urllib.parse.urlencode({{"apiKey": key, "tag": tag, "page": page}})
    with urllib.request.urlopen(f"{{base}}/bulk-status-by-tag?{{query}}", timeout=30) as answer:
        body = json.loads(answer.read())
    batch = body["StatutResponse_List"]
    if not batch:
        break
    rows.extend((tag, i["phoneNumber"], i["status"], i["stopSMS"], i["date"]) for i in batch)
    if len(rows) >= int(body["total"]):
        break
    page += 1
conn = sqlite3.connect(path)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=NORMAL")
conn.execute("CREATE TABLE s (tag TEXT, phone TEXT, status TEXT, stop INTEGER, date TEXT, "
             "UNIQUE (tag, phone))")
conn.executemany("INSERT INTO s VALUES (?, ?, ?, ?, ?) ON CONFLICT (tag, phone) DO UPDATE SET "
                 "status = excluded.status, stop = excluded.stop, date = excluded.date", rows)
conn.commit()
print(conn.execute("SELECT count(*) FROM s").fetchone()[0])
"""


def baseline_sqlite(server: PageServer, path: Path) -> float:
    """Fetch every page, json.loads, one executemany upsert: the least any poller does."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS s (tag TEXT, phone TEXT, status TEXT, stop INTEGER, "
        "date TEXT, UNIQUE (tag, phone))"
    )
    os.sync()
    start = time.perf_counter()
    rows = fetch_rows(server)
    conn.executemany(
        "INSERT INTO s VALUES (?, ?, ?, ?, ?) ON CONFLICT (tag, phone) DO UPDATE SET "
        "status = excluded.status, stop = excluded.stop, date = excluded.date",
        rows,
    )
    conn.commit()
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


_BARE_STATUS = {"Delivered": "delivered", "Waiting": "waiting"}


def contract_floor(server: PageServer, path: Path) -> tuple[float, float]:
    """The first poll and the re-poll with bare ``sqlite3`` into the daemon's schema.

    Returns:
        (first poll seconds, re-poll seconds); leaves the simulator serving "changed".
    """
    engine = create_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    with engine.begin() as conn:
        tracking.track(conn, TAG, sent_at=SENT, window_ends_at=SENT + timedelta(hours=48), now=SENT)
    engine.dispose()
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        conn.execute(f"PRAGMA {pragma}")
    now = sqlite_text(SENT + timedelta(hours=1))
    texts: dict[str, str] = {}

    def as_text(date: str) -> str:  # a campaign shares few dates: convert each once
        if date not in texts:
            texts[date] = sqlite_text(datetime.fromtimestamp(int(date), UTC))
        return texts[date]

    server.serve("first")
    os.sync()
    start = time.perf_counter()
    rows = [
        (tag, phone, _BARE_STATUS[status], status, stop, as_text(date), now,
         None if status == "Waiting" else now, now)
        for tag, phone, status, stop, date in fetch_rows(server)
    ]  # fmt: skip
    insert = (
        "INSERT INTO delivery_statuses (tag, phone_number, status, provider_status, stop_sms, "
        "reported_at, first_seen_at, resolved_at, updated_at) VALUES "
    )
    whole = len(rows) - len(rows) % 100  # 100 rows to a statement, as the daemon sends them
    conn.execute("BEGIN")
    conn.executemany(
        insert + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * 100),
        [tuple(chain.from_iterable(rows[i : i + 100])) for i in range(0, whole, 100)],
    )
    conn.executemany(insert + "(?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[whole:])
    conn.execute(
        "INSERT INTO delivery_status_events (tag, phone_number, old_status, new_status, "
        "reported_at, observed_at) SELECT tag, phone_number, NULL, status, reported_at, "
        "first_seen_at FROM delivery_statuses WHERE tag = ?",
        (TAG,),
    )
    conn.execute("COMMIT")
    first = time.perf_counter() - start

    server.serve("changed")
    os.sync()
    start = time.perf_counter()
    fetched = fetch_rows(server)
    stored = {
        phone: (status, stop, reported)
        for phone, status, stop, reported in conn.execute(
            "SELECT phone_number, status, stop_sms, reported_at FROM delivery_statuses "
            "WHERE tag = ?",
            (TAG,),
        )
    }
    changed = [
        (phone, stored[phone][0], _BARE_STATUS[status], status, as_text(date))
        for _, phone, status, stop, date in fetched
        if stored[phone] != (_BARE_STATUS[status], stop, as_text(date))
    ]
    conn.execute("BEGIN")
    conn.executemany(
        "UPDATE delivery_statuses SET status = ?, provider_status = ?, reported_at = ?, "
        "resolved_at = ?, updated_at = ? WHERE tag = ? AND phone_number = ?",
        [(new, raw, date, now, now, TAG, phone) for phone, _, new, raw, date in changed],
    )
    conn.executemany(
        "INSERT INTO delivery_status_events (tag, phone_number, old_status, new_status, "
        "reported_at, observed_at) VALUES (?, ?, ?, ?, ?, ?)",
        [(TAG, phone, old, new, date, now) for phone, old, new, _, date in changed],
    )
    conn.execute("COMMIT")
    repoll = time.perf_counter() - start
    conn.close()
    assert len(changed) == len(fetched) // 100, len(changed)  # the same 1 % as the daemon's
    return first, repoll


def baseline_postgres(server: PageServer, url: str) -> float:
    """The same with psycopg's executemany."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_baseline")
        conn.execute(
            "CREATE TABLE bench_baseline (tag TEXT, phone TEXT, status TEXT, stop BOOLEAN, "
            "date TEXT, UNIQUE (tag, phone))"
        )
        conn.commit()
        start = time.perf_counter()
        rows = [(t, p, s, bool(st), d) for t, p, s, st, d in fetch_rows(server)]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO bench_baseline VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tag, phone) "
                "DO UPDATE SET status = excluded.status, stop = excluded.stop, "
                "date = excluded.date",
                rows,
            )
        conn.commit()
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE bench_baseline")
        conn.commit()
    return elapsed


def fetch_rows(server: PageServer) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    with httpx.Client() as http:
        page = 1
        while True:
            body = json.loads(
                http.get(
                    f"{server.url}/bulk-status-by-tag",
                    params={"apiKey": KEY, "tag": TAG, "page": page},
                ).content
            )
            batch = body["StatutResponse_List"]
            if not batch:
                break
            rows.extend(
                (TAG, i["phoneNumber"], i["status"], i["stopSMS"], i["date"]) for i in batch
            )
            if len(rows) >= int(body["total"]):
                break
            page += 1
    return rows


def make_poller(
    server: PageServer, url: str, *, track: bool = True
) -> tuple[Poller, Callable[[], None]]:
    settings = load_settings(
        {},
        api_key=KEY,
        base_url=server.url,
        database_url=url,
        rate_limit_per_second=0,
        http_timeout_seconds=30,
    )
    app = App(settings, clock=lambda: SENT + timedelta(hours=1))
    if track:
        with app.engine.begin() as conn:
            tracking.track(
                conn, TAG, sent_at=SENT, window_ends_at=SENT + timedelta(hours=48), now=SENT
            )
    return app.poller, app.close


def baseline(server: PageServer, args: argparse.Namespace, sqlite_path: Path) -> float:
    """The baseline into ``--postgres``, else into a new SQLite file at ``sqlite_path``."""
    if args.postgres:
        return baseline_postgres(server, args.postgres)
    return baseline_sqlite(server, sqlite_path)


def cold_repoll(server: PageServer, args: argparse.Namespace, sqlite_url: str) -> float:
    """The re-poll by a poller that did not make the first poll (untimed first poll)."""
    url = args.postgres or sqlite_url
    if args.postgres:
        _reset_postgres(url)
    server.serve("first")
    poller, close = make_poller(server, url)
    _check(poller.poll(TAG), args.numbers)
    close()
    server.serve("changed")
    poller, close = make_poller(server, url, track=False)
    os.sync()
    elapsed = timed(lambda: _check(poller.poll(TAG), args.numbers, changed=args.numbers // 100))
    close()
    return elapsed


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def whole_commands(server: PageServer, args: argparse.Namespace, tmp: Path) -> None:
    """The headline: the bare script and ``track`` + ``poll`` as whole processes."""
    script = str(Path(sys.executable).with_name("smspartner-status"))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SMSPARTNER_") and "proxy" not in k.lower()
    }
    env.update(
        SMSPARTNER_API_KEY=KEY,
        SMSPARTNER_BASE_URL=server.url,
        SMSPARTNER_RATE_LIMIT_PER_SECOND="0",
    )
    # An installed package carries its bytecode (pip compiles it at install); an editable
    # checkout under PYTHONDONTWRITEBYTECODE=1 would compile daemon/ from source in every
    # command (30-80 ms), which no user pays. Compile it once, as pip would.
    compileall.compile_dir(Path(daemon.__file__).parent, quiet=1)
    bare_times, track_times, poll_times = [], [], []
    bare_requests = poll_requests = 0

    def run(argv: list[str], extra: dict[str, str] | None = None) -> tuple[float, str]:
        os.sync()  # no earlier step's writes still on their way to disk
        start = time.perf_counter()
        done = subprocess.run(
            argv, env={**env, **(extra or {})}, cwd=tmp, capture_output=True, check=False
        )
        elapsed = time.perf_counter() - start
        if done.returncode:
            what = "the bare script" if argv[1] == "-c" else " ".join(argv[1:])
            raise SystemExit(f"{what} failed: {done.stdout.decode()}{done.stderr.decode()}")
        return elapsed, done.stdout.decode()

    def bare(rnd: int) -> None:
        nonlocal bare_requests
        before = server.requests()
        path = tmp / f"bare{rnd}.db"
        elapsed, out = run([sys.executable, "-c", BARE_SCRIPT, server.url, KEY, TAG, str(path)])
        assert int(out) == args.numbers, out
        bare_times.append(elapsed)
        bare_requests = server.requests() - before

    def cli(rnd: int) -> None:
        nonlocal poll_requests
        db = {"SMSPARTNER_DATABASE_URL": f"sqlite:///{tmp / f'cli{rnd}.db'}"}
        track_times.append(run([script, "track", TAG], db)[0])
        before = server.requests()
        elapsed, out = run([script, "poll", TAG], db)
        assert f"{args.numbers} numbers seen" in out, out
        poll_times.append(elapsed)
        poll_requests = server.requests() - before

    server.serve("first")
    for rnd in range(args.rounds):
        for step in (bare, cli) if rnd % 2 == 0 else (cli, bare):
            step(rnd)

    ratios = [p / b for p, b in zip(poll_times, bare_times, strict=True)]
    print(
        f"{args.numbers:,} numbers in pages of 1,000 from a static loopback server, SQLite, "
        f"{args.rounds} alternating rounds; whole commands, process start included"
    )
    print(
        f"  bare script (urllib + json.loads + executemany): {_spread(bare_times)}"
        f"  {bare_requests} requests"
    )
    print(f"  smspartner-status track TAG:                     {_spread(track_times)}")
    print(
        f"  smspartner-status poll TAG:                      {_spread(poll_times)}"
        f"  {poll_requests} requests"
    )
    print(
        f"  poll / bare script: {statistics.median(ratios):.2f}x (rounds: "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; goal <= 2x, limit 3x)"
    )


def _spread(times: list[float]) -> str:
    """Median and range, in seconds."""
    return f"{statistics.median(times):5.2f} s ({min(times):.2f}–{max(times):.2f})"


def in_process(server: PageServer, args: argparse.Namespace, tmp: str) -> None:
    """Where the time goes: the poller and the baselines inside this process."""
    configure_logging(level="warning")
    tune_gc()  # as smspartner-status does at start-up

    base_times, first_times, repoll_times, cold_times = [], [], [], []
    floor_firsts, floor_repolls = [], []
    for rnd in range(args.rounds):
        server.serve("first")
        before = baseline(server, args, Path(tmp) / f"base{rnd}a.db")
        if args.postgres:
            url = args.postgres
            _reset_postgres(url)
        else:
            url = f"sqlite:///{tmp}/ours{rnd}.db"
        poller, close = make_poller(server, url)
        os.sync()  # each measurement starts with no other writes still on their way to disk
        first_times.append(timed(lambda p=poller: _check(p.poll(TAG), args.numbers)))
        # The baseline again, and the mean of both: the machine's speed drifts within
        # a round, and one baseline sample made single rounds swing by up to 2x.
        base_times.append((before + baseline(server, args, Path(tmp) / f"base{rnd}b.db")) / 2)
        server.serve("changed")
        os.sync()
        repoll_times.append(
            timed(lambda p=poller: _check(p.poll(TAG), args.numbers, changed=args.numbers // 100))
        )
        close()
        cold_times.append(cold_repoll(server, args, f"sqlite:///{tmp}/cold{rnd}.db"))
        if not args.postgres:
            floor = contract_floor(server, Path(tmp) / f"floor{rnd}.db")
            floor_firsts.append(floor[0] / base_times[-1])
            floor_repolls.append(floor[1] / floor[0])

    base, first, repoll = (statistics.median(t) for t in (base_times, first_times, repoll_times))
    # Each round measures ours between two baselines, so the per-round ratios are
    # steadier than a ratio of medians on a machine whose speed drifts.
    first_ratios = [f / b for f, b in zip(first_times, base_times, strict=True)]
    repoll_ratios = [r / f for r, f in zip(repoll_times, first_times, strict=True)]
    engine = "PostgreSQL" if args.postgres else "SQLite"
    print(f"in process, {engine}, median of {args.rounds} rounds")
    print(f"  baseline (httpx + json.loads + executemany upsert): {base:6.2f} s")
    print(
        f"  first poll (daemon):                               {first:6.2f} s"
        f"  = {statistics.median(first_ratios):.2f}x baseline (rounds: "
        f"{', '.join(f'{r:.2f}' for r in first_ratios)}; goal <= 2x, never > 3x)"
    )
    print(
        f"  re-poll, 1% changed (daemon, same poller):         {repoll:6.2f} s"
        f"  = {statistics.median(repoll_ratios):.2f}x first poll (rounds: "
        f"{', '.join(f'{r:.2f}' for r in repoll_ratios)}; goal <= 0.5x)"
    )
    cold_ratios = [c / f for c, f in zip(cold_times, first_times, strict=True)]
    print(
        f"  re-poll by a new poller (nothing remembered):      "
        f"{statistics.median(cold_times):6.2f} s  = {statistics.median(cold_ratios):.2f}x "
        f"first poll (rounds: {', '.join(f'{r:.2f}' for r in cold_ratios)})"
    )
    if floor_firsts:
        pairs = zip(floor_firsts, floor_repolls, strict=True)
        print(
            "  contract floor (bare sqlite3, this schema's writes): first poll "
            f"{statistics.median(floor_firsts):.2f}x baseline, re-poll "
            f"{statistics.median(floor_repolls):.2f}x its first poll (rounds: "
            + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in pairs)
            + ")"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numbers", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-in-process", action="store_true", help="only the whole commands (the headline)"
    )
    parser.add_argument("--postgres", metavar="URL", help="in-process figures on PostgreSQL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PageServer(args.numbers) as server:
        whole_commands(server, args, Path(tmp))
        if not args.no_in_process:
            in_process(server, args, tmp)


def _check(result: Any, numbers: int, changed: int | None = None) -> None:
    assert result.ok and result.numbers_seen == numbers, result
    assert changed is None or result.changed == changed, (result.changed, changed)


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    migrate.downgrade(engine)
    engine.dispose()


if __name__ == "__main__":
    main()
