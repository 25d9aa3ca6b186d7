"""Benchmark: the daemon's own cost per tag poll, over 10,000 small active tags.

10,000 tags of 5 numbers each (one page per tag), served by the simulator in a child
process. Compared in the same run, over the same loopback server:

  * baseline: the bare HTTP round trips for the 10,000 tags with one ``httpx.Client``
    shared by 4 threads (the daemon's concurrency), ``json.loads`` of each body;
  * daemon: one ``Daemon.run_once()`` pass over the 10,000 due tags into a SQLite file
    (rate limit 0, concurrency 4, metrics hooks and ``info`` JSON logs as ``run`` has
    them, written to /dev/null): claim, fetch, merge, diff, upsert, events, poll_runs,
    lifecycle.

Overhead per tag poll = (daemon − baseline) / tags. Goals (issue): ≤ 5 ms overhead per
tag poll, ≤ 200 MB peak RSS (``getrusage`` of this process; the simulator is a child).
``--profile FILE`` writes a cProfile of the daemon pass (every thread) and prints its top.

Run:  .venv/bin/python -m tests.benchmarks.tags_10k [--tags 10000] [--numbers 5]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import pstats
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from daemon import queries, tracking
from daemon.app import App
from daemon.log import configure_logging
from daemon.settings import load_settings
from daemon.simulator import Simulator

KEY = "bench-key"
CONCURRENCY = 4  # the default of SMSPARTNER_CONCURRENCY; --concurrency changes it


def tag_name(i: int) -> str:
    return f"t{i:05d}"


class RemoteSimulator:
    """The simulator in a child process, serving ``tags`` tags of ``numbers`` each."""

    def __init__(self, tags: int, numbers: int, sent: datetime) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, tags, numbers, sent), daemon=True)
        self._proc.start()
        self.url: str = self._pipe.recv()

    def close(self) -> None:
        self._pipe.send("stop")
        self._proc.join(10)


def _serve(pipe: Any, tags: int, numbers: int, sent: datetime) -> None:
    date = str(int((sent + timedelta(seconds=30)).timestamp()))
    with Simulator(api_key=KEY, page_size=500) as sim:
        for t in range(tags):
            sim.set_items(
                tag_name(t),
                [
                    {
                        "phoneNumber": f"+336{t:05d}{n:03d}",
                        "status": "Delivered",
                        "stopSMS": False,
                        "date": date,
                    }
                    for n in range(numbers)
                ],
            )
        pipe.send(sim.url)
        pipe.recv()


def baseline(sim: RemoteSimulator, tags: int, numbers: int, concurrency: int) -> float:
    """The bare round trips: one client, as many threads, ``json.loads`` of every page."""
    with httpx.Client(timeout=30) as http:

        def fetch(t: int) -> None:
            body = json.loads(
                http.get(
                    f"{sim.url}/bulk-status-by-tag",
                    params={"apiKey": KEY, "tag": tag_name(t), "page": 1},
                ).content
            )
            assert len(body["StatutResponse_List"]) == numbers

        fetch(0)  # connect once, as the daemon's client would be warm after a dispatch
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(fetch, range(tags)))
        return time.perf_counter() - start


class ThreadProfiles:
    """cProfile of every thread that runs a wrapped function (cProfile sees one thread)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[[str], Any]) -> Callable[[str], Any]:
        def profiled(tag: str) -> Any:
            profile = getattr(self._local, "profile", None)
            if profile is None:
                profile = self._local.profile = cProfile.Profile()
                with self._lock:
                    self.profiles.append(profile)
            profile.enable()
            try:
                return fn(tag)
            finally:
                profile.disable()

        return profiled


def daemon_pass(
    sim: RemoteSimulator,
    url: str,
    tags: int,
    now: datetime,
    concurrency: int,
    profile: str | None,
) -> tuple[float, int, int]:
    """Track every tag, then time one ``run_once`` pass.

    Returns:
        (seconds, polls, distinct tags polled).
    """
    settings = load_settings(
        {},
        api_key=KEY,
        base_url=sim.url,
        database_url=url,
        rate_limit_per_second=0,
        http_timeout_seconds=30,
        concurrency=concurrency,
    )
    # As `run --once` builds it: metrics count every request and poll.
    app = App(settings, clock=lambda: datetime.now(UTC), service=True)
    engine = app.engine
    sent = now - timedelta(hours=1)
    with engine.begin() as conn:
        for t in range(tags):
            tracking.track(
                conn, tag_name(t), sent_at=sent, window_ends_at=sent + timedelta(hours=48), now=now
            )
    with app:
        daemon = app.daemon
        profiles = ThreadProfiles() if profile else None
        if profiles:
            # A worker polls a tag, then claims and polls the next one in the same call:
            # profile the whole worker loop (a private method, for this benchmark only).
            daemon._run_poll = profiles.wrap(daemon._run_poll)  # type: ignore[method-assign]
        main_profile = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if main_profile:
            main_profile.enable()
        stats = daemon.run_once()
        if main_profile:
            main_profile.disable()
        elapsed = time.perf_counter() - start
    assert stats.failures == 0, [r.error for r in stats.results if not r.ok][:3]
    with engine.connect() as conn:
        states = {r["state"] for r in queries.list_tags(conn)}
    assert states == {"completed"}, states
    app.close()
    if profile and profiles and main_profile:
        merged = pstats.Stats(main_profile, *profiles.profiles)
        merged.dump_stats(profile)
        print(f"profile of the daemon pass (all threads) written to {profile}; top 25:")
        merged.sort_stats("tottime").print_stats(25)
    return elapsed, stats.polls, len({r.tag for r in stats.results})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--numbers", type=int, default=5, help="numbers per tag")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the daemon pass")
    args = parser.parse_args()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - for the whole run
    configure_logging(level="info", fmt="json", stream=devnull)

    now = datetime.now(UTC)
    sim = RemoteSimulator(args.tags, args.numbers, now - timedelta(hours=1))
    try:
        base = baseline(sim, args.tags, args.numbers, args.concurrency)
        rss_before = peak_rss_mb()
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'tags.db'}"
            ours, polls, polled = daemon_pass(
                sim, url, args.tags, now, args.concurrency, args.profile
            )
    finally:
        sim.close()
    assert polled == args.tags, (polled, args.tags)
    overhead_ms = (ours - base) / args.tags * 1000
    print(
        f"{args.tags:,} active tags x {args.numbers} numbers, one page each, SQLite file, "
        f"concurrency {args.concurrency}, rate limit off"
    )
    print(
        f"  baseline (httpx, {args.concurrency} threads, json.loads): {base:6.2f} s  "
        f"= {base / args.tags * 1000:.2f} ms per tag"
    )
    print(
        f"  daemon (Daemon.run_once):                {ours:6.2f} s  "
        f"= {ours / args.tags * 1000:.2f} ms per tag"
    )
    print(f"  daemon overhead per tag poll:            {overhead_ms:6.2f} ms  (goal <= 5 ms)")
    if polls != polled:
        print(f"  polls: {polls:,} for {polled:,} tags ({polls - polled} tags polled twice)")
    print(
        f"  peak RSS: {peak_rss_mb():.0f} MB (before the daemon pass: {rss_before:.0f} MB; "
        "goal <= 200 MB)"
    )


if __name__ == "__main__":
    main()
