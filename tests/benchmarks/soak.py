"""Soak: 2,000 active tags against the simulator, faults on, for 10 minutes.

The simulator runs in a child process (fault rate 5 %: 500s, 429s, HTML and truncated
bodies); the real Daemon polls every tag on the default cadence (every minute while
tags are young) into a SQLite file. Every 30 s it samples RSS, threads and open file
descriptors; at the end it reports whether they stayed flat and how punctual polls were
(interval between two polls of one tag: the cadence is 60 s).

Run:  .venv/bin/python -m tests.benchmarks.soak [--minutes 10] [--tags 2000]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa

from daemon import migrate, tracking
from daemon.db import create_engine, poll_runs
from daemon.health import Health
from daemon.log import configure_logging
from daemon.poller import Poller
from daemon.scheduler import Daemon
from daemon.settings import load_settings
from daemon.simulator import Simulator
from daemon.smspartner import SmsPartnerClient

KEY = "soak-key"


def _serve(pipe: Any, tags: int) -> None:
    with Simulator(api_key=KEY, seed=3, fault_rate=0.05) as sim:
        for i in range(tags):
            sim.add_tag(f"soak-{i:05d}", 20)
        pipe.send(sim.url)
        pipe.recv()


def sample() -> tuple[float, int, int]:
    """RSS now (MiB), live threads, open file descriptors."""
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    rss = rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return rss, threading.active_count(), len(os.listdir("/proc/self/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--tags", type=int, default=2000)
    args = parser.parse_args()
    configure_logging(level="error")

    ctx = multiprocessing.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, args.tags), daemon=True)
    proc.start()
    url = pipe.recv()

    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/soak.db"
        settings = load_settings(
            {}, api_key=KEY, base_url=url, database_url=db, rate_limit_per_second=0, concurrency=4
        )
        engine = create_engine(db)
        migrate.upgrade(engine)
        now = datetime.now(UTC)
        with engine.begin() as conn:
            for i in range(args.tags):
                tracking.track(
                    conn,
                    f"soak-{i:05d}",
                    sent_at=now,
                    window_ends_at=now + settings.report_window,
                    now=now,
                )

        def clock() -> datetime:
            return datetime.now(UTC)

        holder: list[Daemon] = []
        with httpx.Client(timeout=10) as http:
            client = SmsPartnerClient(
                http,
                api_key=KEY,
                base_url=url,
                rate_limit_per_second=0,
                sleep=lambda s: holder[0].interruptible_sleep(s),
                deadline=lambda: holder[0].shutdown_deadline(),
            )
            poller = Poller(engine=engine, client=client, settings=settings, clock=clock)
            daemon = Daemon(
                engine=engine,
                poll=poller.poll,
                clock=clock,
                health=Health(clock),
                concurrency=settings.concurrency,
                report_window=settings.report_window,
            )
            holder.append(daemon)
            daemon.start()
            samples = []
            end = time.monotonic() + args.minutes * 60
            while time.monotonic() < end:
                time.sleep(min(30, max(end - time.monotonic(), 0)))
                samples.append(sample())
                print(
                    f"  +{len(samples) * 30:4d} s  rss {samples[-1][0]:6.1f} MiB  threads "
                    f"{samples[-1][1]:3d}  fds {samples[-1][2]:4d}  polls {daemon.stats.polls}",
                    flush=True,
                )
            daemon.stop()

        with engine.connect() as conn:
            runs = conn.execute(
                sa.select(poll_runs.c.tag, poll_runs.c.started_at, poll_runs.c.outcome).order_by(
                    poll_runs.c.tag, poll_runs.c.started_at
                )
            ).all()
        engine.dispose()
    pipe.send("stop")
    proc.join(10)

    started: dict[str, list[datetime]] = defaultdict(list)
    for tag, at, _ in runs:
        started[tag].append(at)
    gaps = [
        (b - a).total_seconds() for times in started.values() for a, b in itertools.pairwise(times)
    ]
    late = sum(1 for g in gaps if g > 90)
    outcomes: dict[str, int] = defaultdict(int)
    for *_, outcome in runs:
        outcomes[outcome] += 1
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.tags:,} tags for {args.minutes:g} min: {len(runs):,} polls {dict(outcomes)}")
    print(
        f"  every tag polled: {len(started) == args.tags}; interval between polls of a tag "
        f"(cadence 60 s): median {statistics.median(gaps):.1f} s, p95 "
        f"{statistics.quantiles(gaps, n=20)[-1]:.1f} s, max {max(gaps):.1f} s, "
        f"{late} of {len(gaps):,} over 90 s"
    )
    print(
        f"  rss {first[0]:.1f} → {last[0]:.1f} MiB (peak {peak:.1f}); threads {first[1]} → "
        f"{last[1]}; open fds {first[2]} → {last[2]}"
    )


if __name__ == "__main__":
    main()
