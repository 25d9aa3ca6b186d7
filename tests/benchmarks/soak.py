"""Soak: 2,000 healthy tags and a dozen hostile ones against the simulator, for 10 minutes.

The simulator runs in a child process with 5 % random transient faults (500s, 429s, HTML
and truncated bodies) on every request. Next to the healthy tags (20 numbers each) it
serves hostile ones, each kind once broke the daemon (issue 17):

* poisoned: 20 good numbers plus an item with a lone surrogate status, NUL in a phone
  number and a status, a 300-character or a 5 MB phone number, or a date in the year 5138;
* trickling: every answer sent one byte every 2 s, as many tags as the daemon has workers;
* lying: 3,000 numbers whose every page says ``total: 1``;
* key-echoing: an HTML error page (HTTP 403) echoing the key in every careless spelling,
  and an item whose status holds the key (provider text the daemon stores as is).

The real Daemon polls every tag on the default cadence (every minute while tags are young)
into a SQLite file, with ``info`` JSON logs as ``run`` has them, redaction included. Every
log line goes to a sink that counts events by name and looks for the key in every
spelling. Every 30 s the benchmark samples RSS, threads, open file descriptors and
readiness. At the end it prints how punctual the healthy tags' polls were against their
cadence, whether RSS, threads and descriptors stayed flat, what became of the hostile
tags, the log events counted (``poll.crashed`` must be 0) and whether the key appeared in
any log line or error column. It asserts nothing: it is a measurement, read by a person.

The key escaped (``\\/`` or ``&amp;`` …) by a JSON ``message`` with code 10 (the
simulator's ``echo_key``) is left out: codes 1/10 pause all polling for five minutes by
design, so it would stop every healthy tag; the tests cover it
(tests/integration/test_faults.py).

Run:  .venv/bin/python -m tests.benchmarks.soak [--minutes 10] [--tags 2000]
"""

from __future__ import annotations

import argparse
import html
import io
import itertools
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import sqlalchemy as sa

from daemon import migrate, tracking
from daemon.db import create_engine, delivery_statuses, poll_runs, tracked_tags
from daemon.health import Health
from daemon.log import configure_logging
from daemon.poller import Poller
from daemon.scheduler import Daemon
from daemon.settings import load_settings
from daemon.simulator import Simulator
from daemon.smspartner import SmsPartnerClient
from daemon.status import cadence_interval

#: '/', '&', '+' and capitals: its raw, percent-, form-, JSON- and HTML-escaped
#: spellings all differ, so a redaction that knows only one of them shows.
KEY = "Soak/zQ7w&K3y+9"
#: Part of the key no spelling above escapes: finds a key cut in half, too.
KEY_FRAGMENT = "zq7w"
SAMPLE_EVERY = 30.0  # seconds
#: A healthy tag whose poll was due longer ago than this counts as overdue in a sample.
LATE = timedelta(seconds=15)
#: A healthy tag "missed its window" when two polls are further apart than this many
#: times its cadence.
MISSED = 2.0

_FUTURE = "99999999999"  # Unix seconds in the year 5138
#: Poisoned tags: each serves 20 good numbers and these raw items.
POISON: dict[str, list[dict[str, object]]] = {
    "poison-surrogate": [{"phoneNumber": "+33690000001", "status": "\ud800", "stopSMS": False}],
    "poison-nul": [
        {"phoneNumber": "+3369000\x000002", "status": "Delivered", "stopSMS": False},
        {"phoneNumber": "+33690000003", "status": "Deliv\x00ered", "stopSMS": False},
    ],
    "poison-300": [{"phoneNumber": "x" * 300, "status": "Delivered", "stopSMS": False}],
    "poison-5mb": [{"phoneNumber": "9" * 5_000_000, "status": "Delivered", "stopSMS": False}],
    "poison-5138": [{"phoneNumber": "+33690000004", "status": "Not delivered", "date": _FUTURE}],
}
#: Trickling tags by default: as many as the daemon has workers (issue 17's four).
TRICKLING = 4
LYING_TAG, LYING_NUMBERS = "lying-total", 3_000
ECHO_HTML_TAG, ECHO_ITEM_TAG = "echo-key-html", "echo-key-item"


def key_spellings(key: str) -> list[str]:
    """The key as a log line or an error could carry it, lowercased (matched so):
    raw, percent-encoded, form-encoded, JSON-escaped and HTML-escaped.

    Written here rather than taken from :mod:`daemon.redaction`, so the check does not
    share the blind spots of the code it checks.
    """
    spellings = {
        key,
        quote(key, safe=""),
        quote_plus(key),
        json.dumps(key)[1:-1].replace("/", "\\/"),
        html.escape(key),
        html.escape(key).replace("/", "&#47;"),
        KEY_FRAGMENT,
    }
    return sorted({s.lower() for s in spellings})


def trickle_tags(count: int) -> list[str]:
    """The trickling tags' names."""
    return [f"trickle-{i}" for i in range(count)]


def _serve(pipe: Any, tags: int, trickling: int) -> None:
    """The child process: the simulator with the healthy and the hostile tags."""
    with Simulator(api_key=KEY, seed=3, fault_rate=0.05) as sim:
        for i in range(tags):
            sim.add_tag(f"soak-{i:05d}", 20)
        for tag, items in POISON.items():
            sim.set_items(tag, items)
            sim.add_tag(tag, 20)  # served before the raw items
        for tag in trickle_tags(trickling):
            sim.add_tag(tag, 20)
            sim.inject("trickle", tag=tag, times=None, bytes=1, interval=2)
        sim.add_tag(LYING_TAG, LYING_NUMBERS)
        sim.inject("lying_total", tag=LYING_TAG, times=None, total=1)
        sim.add_tag(ECHO_HTML_TAG, 20)
        sim.inject("echo_key_html", tag=ECHO_HTML_TAG, times=None, status=403)
        echoed = json.dumps(KEY)[1:-1].replace("/", "\\/")
        sim.set_items(
            ECHO_ITEM_TAG,
            [
                {
                    "phoneNumber": "+33690000005",
                    "status": f"Unknown apiKey {echoed}",
                    "stopSMS": False,
                }
            ],
        )
        sim.add_tag(ECHO_ITEM_TAG, 20)
        pipe.send(sim.url)
        pipe.recv()


def hostile_tags(trickling: int) -> list[str]:
    """Every tag that is not a healthy one."""
    return [*POISON, *trickle_tags(trickling), LYING_TAG, ECHO_HTML_TAG, ECHO_ITEM_TAG]


def group_of(tag: str) -> str:
    """The kind of tag, for the summary."""
    if tag.startswith("soak-"):
        return "healthy"
    return tag if tag in POISON or tag in (LYING_TAG, ECHO_HTML_TAG, ECHO_ITEM_TAG) else "trickle"


class LogSink(io.TextIOBase):
    """Where every log line goes (ours and the bridged stdlib loggers'): counts events
    by name and level, and looks for the key in every line.

    ``print`` writes a line and its newline separately and the logging handler writes
    both at once, so each write is taken as whole lines.
    """

    def __init__(self, key: str) -> None:
        super().__init__()
        self.events: Counter[str] = Counter()
        self.levels: Counter[str] = Counter()
        self.lines = 0
        self.leaks: Counter[str] = Counter()  # event name -> lines holding the key
        self.examples: dict[str, str] = {}  # first error-level line of each event
        self._needles = key_spellings(key)
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._take(line)
        return len(text)

    def _take(self, line: str) -> None:
        try:
            record = json.loads(line)
            event = str(record.get("event", "?"))
            level = str(record.get("level", "?"))
            if "logger" in record:  # a stdlib logger's line: its message is free text
                event = f"{record['logger']}: {event[:40]}"
        except (ValueError, AttributeError):
            event, level = "(not JSON)", "?"
        lowered = line.lower()
        leaked = any(needle in lowered for needle in self._needles)
        with self._lock:
            self.lines += 1
            self.events[event] += 1
            self.levels[level] += 1
            if leaked:
                self.leaks[event] += 1
            if level in ("error", "critical") and event not in self.examples:
                self.examples[event] = line[:400] if not leaked else "(holds the key)"


@dataclass
class Sample:
    """One look at the process, every :data:`SAMPLE_EVERY` seconds."""

    at: float  # seconds since the daemon started
    rss: float  # MiB
    threads: int
    fds: int
    polls: int
    problems: list[str] = field(default_factory=list)
    overdue: int = 0  # healthy tags due more than LATE ago


def overdue(engine: sa.Engine, before: datetime) -> int:
    """How many healthy tags are still waiting for a poll that was due before ``before``."""
    with engine.connect() as conn:
        count = conn.execute(
            sa.select(sa.func.count())
            .select_from(tracked_tags)
            .where(
                tracked_tags.c.state == "active",
                tracked_tags.c.tag.like("soak-%"),
                tracked_tags.c.next_poll_at < before,
            )
        ).scalar_one()
    return int(count)


def measure() -> tuple[float, int, int]:
    """RSS now (MiB), live threads, open file descriptors."""
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    rss = rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return rss, threading.active_count(), len(os.listdir("/proc/self/fd"))


def flat(values: list[float], tolerance: float) -> bool:
    """Whether the second half of a series peaks no higher than its first half did
    (plus ``tolerance``): a leak climbs, churn around a level does not."""
    half = len(values) // 2
    return max(values[half:]) <= max(values[:half]) + tolerance


def spread(values: list[float]) -> str:
    """Median, p95 and max of ``values``."""
    p95 = statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]
    return f"median {statistics.median(values):.1f}, p95 {p95:.1f}, max {max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--tags", type=int, default=2000, help="healthy tags (default 2000)")
    parser.add_argument(
        "--trickling",
        type=int,
        default=TRICKLING,
        help=f"trickling tags (default {TRICKLING}, the daemon's workers)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info"),
        default="info",
        help="what the daemon logs (debug also has httpx's and SQLAlchemy's lines)",
    )
    args = parser.parse_args()
    sink = LogSink(KEY)
    configure_logging(level=args.log_level, fmt="json", secrets=[KEY], stream=sink)
    uncaught: list[str] = []
    previous_hook = threading.excepthook

    def on_uncaught(hook_args: threading.ExceptHookArgs) -> None:
        uncaught.append(getattr(hook_args.exc_type, "__name__", "?"))
        previous_hook(hook_args)

    threading.excepthook = on_uncaught

    ctx = multiprocessing.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, args.tags, args.trickling), daemon=True)
    proc.start()
    url = pipe.recv()
    healthy = [f"soak-{i:05d}" for i in range(args.tags)]

    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/soak.db"
        settings = load_settings(
            {}, api_key=KEY, base_url=url, database_url=db, rate_limit_per_second=0, concurrency=4
        )
        engine = create_engine(db)
        migrate.upgrade(engine)
        now = datetime.now(UTC)
        with engine.begin() as conn:
            tracking.track_many(
                conn,
                [
                    (tag, now, now + settings.report_window)
                    for tag in healthy + hostile_tags(args.trickling)
                ],
                now=now,
            )

        def clock() -> datetime:
            return datetime.now(UTC)

        holder: list[Daemon] = []
        health = Health(clock)
        samples: list[Sample] = []
        with httpx.Client(timeout=settings.http_timeout_seconds) as http:
            client = SmsPartnerClient(
                http,
                api_key=KEY,
                base_url=url,
                max_retries=settings.max_retries,
                retry_backoff=settings.retry_backoff_seconds,
                rate_limit_per_second=settings.rate_limit_per_second,
                max_pages=settings.max_pages,
                sleep=lambda s: holder[0].interruptible_sleep(s),
                deadline=lambda: holder[0].shutdown_deadline(),
            )
            poller = Poller(engine=engine, client=client, settings=settings, clock=clock)
            daemon = Daemon(
                engine=engine,
                poll=poller.poll,
                clock=clock,
                health=health,
                concurrency=settings.concurrency,
                report_window=settings.report_window,
            )
            holder.append(daemon)
            started, started_at = time.monotonic(), clock()
            daemon.start()
            end = started + args.minutes * 60
            while time.monotonic() < end:
                time.sleep(min(SAMPLE_EVERY, max(end - time.monotonic(), 0)))
                s = Sample(time.monotonic() - started, *measure(), daemon.stats.polls)
                s.problems = health.problems()
                s.overdue = overdue(engine, clock() - LATE)
                samples.append(s)
                print(
                    f"  +{s.at:4.0f} s  rss {s.rss:6.1f} MiB  threads {s.threads:3d}  "
                    f"fds {s.fds:4d}  polls {s.polls:6,}  healthy tags overdue {s.overdue:4}  "
                    f"{'ready' if not s.problems else 'NOT READY: ' + '; '.join(s.problems)}",
                    flush=True,
                )
            stopped_at = clock()
            stop_began = time.monotonic()
            daemon.stop()
            stop_seconds = time.monotonic() - stop_began

        with engine.connect() as conn:
            runs = conn.execute(
                sa.select(
                    poll_runs.c.tag,
                    poll_runs.c.started_at,
                    poll_runs.c.finished_at,
                    poll_runs.c.outcome,
                    poll_runs.c.error,
                ).order_by(poll_runs.c.tag, poll_runs.c.started_at)
            ).all()
            tags = {r.tag: r for r in conn.execute(sa.select(tracked_tags)).all()}
            numbers = dict(
                conn.execute(
                    sa.select(delivery_statuses.c.tag, sa.func.count()).group_by(
                        delivery_statuses.c.tag
                    )
                ).all()
            )
            provider_statuses = [
                status
                for (status,) in conn.execute(
                    sa.select(delivery_statuses.c.provider_status).where(
                        delivery_statuses.c.tag.in_(hostile_tags(args.trickling))
                    )
                )
            ]
        engine.dispose()
    pipe.send("stop")
    proc.join(10)
    threading.excepthook = previous_hook

    report(
        args=args,
        runs=runs,
        tags=tags,
        numbers=numbers,
        provider_statuses=provider_statuses,
        healthy=healthy,
        started_at=started_at,
        stopped_at=stopped_at,
        stop_seconds=stop_seconds,
        samples=samples,
        sink=sink,
        uncaught=uncaught,
        cadence=settings.cadence,
    )


def report(
    *,
    args: argparse.Namespace,
    runs: list[Any],
    tags: dict[str, Any],
    numbers: dict[str, int],
    provider_statuses: list[str],
    healthy: list[str],
    started_at: datetime,
    stopped_at: datetime,
    stop_seconds: float,
    samples: list[Sample],
    sink: LogSink,
    uncaught: list[str],
    cadence: Any,
) -> None:
    """Print what the run showed."""
    polls: dict[str, list[Any]] = defaultdict(list)
    for run in runs:
        polls[run.tag].append(run)
    by_group: dict[str, Counter[str]] = defaultdict(Counter)
    for run in runs:
        by_group[group_of(run.tag)][run.outcome] += 1
    print(
        f"\n{args.tags:,} healthy and {len(hostile_tags(args.trickling))} hostile tags for "
        f"{args.minutes:g} min: {len(runs):,} polls; daemon.stop() took {stop_seconds:.1f} s"
    )

    # Punctuality of the healthy tags: every interval between two polls of a tag, and the
    # one from its last poll to the end (a tag no longer polled at all must show too).
    ratios, gaps, firsts, missed_tags = [], [], [], set()
    for tag in healthy:
        times = [r.started_at for r in polls.get(tag, [])]
        if not times:
            missed_tags.add(tag)
            continue
        firsts.append((times[0] - started_at).total_seconds())
        intervals = list(itertools.pairwise(times))
        if tags[tag].state == "active":
            intervals.append((times[-1], stopped_at))
        for a, b in intervals:
            due = cadence_interval(a - tags[tag].sent_at, cadence).total_seconds()
            gap = (b - a).total_seconds()
            if b is not stopped_at:
                gaps.append(gap)
            ratios.append(gap / due)
            if gap > MISSED * due:
                missed_tags.add(tag)
    outcomes = dict(by_group["healthy"])
    print(f"  healthy: {sum(outcomes.values()):,} polls {outcomes}")
    if gaps:
        late = sum(1 for r in ratios if r > 1.5)
        print(
            f"  interval between polls of a healthy tag (cadence "
            f"{cadence_interval(timedelta(0), cadence).total_seconds():g} s): {spread(gaps)} s; "
            f"{late} of {len(ratios):,} over 1.5× cadence"
        )
    if firsts:
        print(f"  first poll after start: {spread(firsts)} s")
    never = sum(1 for tag in healthy if tag not in polls)
    print(
        f"  healthy tags that missed a poll window (a gap over {MISSED:g}× cadence, or never "
        f"polled): {len(missed_tags)} of {len(healthy):,} ({never} never polled)"
    )

    # Resources: the first sample is taken during the start-up backlog; the rest should hold.
    steady = samples[1:] if len(samples) > 2 else samples
    if steady:
        first, last = steady[0], steady[-1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rss = [s.rss for s in steady]
        fds = [float(s.fds) for s in steady]
        threads = [float(s.threads) for s in steady]
        verdicts = {
            "rss": flat(rss, 0.05 * max(rss)) if len(steady) > 1 else None,
            "fds": flat(fds, 4) if len(steady) > 1 else None,
            "threads": flat(threads, 0) if len(steady) > 1 else None,
        }

        def verdict(name: str) -> str:
            ok = verdicts[name]
            return "n/a" if ok is None else ("flat" if ok else "GROWING")

        print(
            f"  from +{first.at:.0f} s to +{last.at:.0f} s: rss {first.rss:.1f} → "
            f"{last.rss:.1f} MiB, max {max(rss):.1f} (process peak {peak:.1f}): "
            f"{verdict('rss')}; threads {first.threads} → {last.threads}, max "
            f"{max(threads):.0f}: {verdict('threads')}; open fds {first.fds} → {last.fds}, "
            f"max {max(fds):.0f}: {verdict('fds')}"
        )
        not_ready = [s for s in samples if s.problems]
        print(f"  readiness: {len(samples) - len(not_ready)} of {len(samples)} samples ready")

    # The hostile tags.
    print("  hostile tags (polls, outcomes, numbers stored, longest poll, last error):")
    for tag in hostile_tags(args.trickling):
        mine = polls.get(tag, [])
        longest = max(((r.finished_at - r.started_at).total_seconds() for r in mine), default=0)
        error = tags[tag].last_error or ""
        if any(n in error.lower() for n in key_spellings(KEY)):
            error = "(holds the key)"
        print(
            f"    {tag:17} {len(mine):3} {dict(Counter(r.outcome for r in mine))} "
            f"{numbers.get(tag, 0):5,} numbers, {longest:5.1f} s, {error[:110] or '-'}"
        )

    # Logs and the key.
    crashed = sink.events["poll.crashed"]
    print(
        f"  log lines: {sink.lines:,} ({dict(sink.levels)}); poll.crashed {crashed} "
        f"(must be 0), poll.failed {sink.events['poll.failed']:,}, api.item_skipped "
        f"{sink.events['api.item_skipped']:,}, api.item_coerced "
        f"{sink.events['api.item_coerced']:,}, api.total_mismatch "
        f"{sink.events['api.total_mismatch']:,}, api.retry_scheduled "
        f"{sink.events['api.retry_scheduled']:,}; uncaught thread exceptions {len(uncaught)}"
    )
    print("  events by name:", ", ".join(f"{e} {n:,}" for e, n in sink.events.most_common()))
    for event, line in sink.examples.items():
        print(f"  first {event}: {line}")
    needles = key_spellings(KEY)
    in_columns = sum(
        1 for r in runs if r.error and any(n in r.error.lower() for n in needles)
    ) + sum(
        1 for t in tags.values() if t.last_error and any(n in t.last_error.lower() for n in needles)
    )
    in_statuses = sum(1 for s in provider_statuses if s and any(n in s.lower() for n in needles))
    leaks = sum(sink.leaks.values())
    print(
        f"  API key in any spelling: {leaks} of {sink.lines:,} log lines"
        f"{' ' + str(dict(sink.leaks)) if leaks else ''}, {in_columns} poll_runs.error / "
        f"tracked_tags.last_error values; {'NEVER SEEN' if not leaks + in_columns else 'LEAKED'}"
    )
    print(
        f"  (provider text kept as is: {in_statuses} delivery_statuses.provider_status "
        f"value(s) of {ECHO_ITEM_TAG} hold the key the provider echoed in a status)"
    )


if __name__ == "__main__":
    main()
