"""Soak: 2,000 healthy tags and a dozen hostile ones against the simulator, for 10 minutes.

The simulator runs in a child process with 5 % random transient faults (500s, 429s, HTML
and truncated bodies) on every request. Next to the healthy tags (20 numbers each) it
serves hostile ones, of the kinds issue 17 found breaking the daemon:

* poisoned: 20 good numbers plus an item with a lone surrogate status, NUL in a phone
  number and a status, a 300-character or a 5 MB phone number, or a date in the year 5138;
* trickling: every answer sent one byte every 2 s, as many tags as the daemon has workers;
* lying: 3,000 numbers whose every page says ``total: 1``;
* key-echoing: an HTML error page (HTTP 403) echoing the key in every careless spelling,
  and an item whose status holds the key (masked before the daemon stores it).

The real Daemon polls every tag on the default cadence (every minute while tags are young)
into a SQLite file, with ``info`` JSON logs as ``run`` has them, redaction included. Every
log line goes to a sink that counts events by name and looks for the key in every
spelling. Every 30 s the benchmark samples RSS, threads, open file descriptors,
readiness and how many healthy tags are overdue. At the end it prints how punctual the
healthy tags' polls were against their cadence, whether RSS, threads and descriptors
stayed flat, what became of the hostile tags, the log events counted (``poll.crashed``
must be 0) and whether the key appeared in any log line or error column. It asserts
nothing: it is a measurement, read by a person.

The key escaped (``\\/`` or ``&amp;`` …) by a JSON ``message`` with code 10 (the
simulator's ``echo_key``) is left out: codes 1/10 pause all polling for five minutes by
design, so it would stop every healthy tag; the tests cover it
(tests/integration/test_faults.py).

Run:  .venv/bin/python -m tests.benchmarks.soak [--minutes 10] [--tags 2000] [--trickling 4]
      [--log-level info|debug]
Figures and what they showed: docs/performance.md, "Soak".
"""

from __future__ import annotations

import argparse
import html
import io
import itertools
import json
import logging
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
from typing import Any, TextIO, cast
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
from daemon.status import CadenceStep, cadence_interval

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
                event = f"({record['logger']})"
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


def spread(values: list[float], digits: int = 1) -> str:
    """Median, p95 and max of ``values``."""
    p95 = statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]
    median, top = statistics.median(values), max(values)
    return f"median {median:.{digits}f}, p95 {p95:.{digits}f}, max {top:.{digits}f}"


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


@dataclass
class Run:
    """What one soak run left behind, read back once the daemon stopped."""

    healthy: list[str]
    hostile: list[str]
    cadence: tuple[CadenceStep, ...]
    started_at: datetime
    stopped_at: datetime
    stop_seconds: float  # how long daemon.stop() took
    samples: list[Sample]
    runs: list[Any] = field(default_factory=list)  # poll_runs rows, by tag and start
    tags: dict[str, Any] = field(default_factory=dict)  # tracked_tags rows by tag
    numbers: Counter[str] = field(default_factory=Counter)  # numbers stored per tag
    provider_statuses: list[str] = field(default_factory=list)  # of the hostile tags


def main() -> None:
    args = parse_args()
    sink = LogSink(KEY)
    # A file-like object as far as print() and logging.StreamHandler go, not a TextIO.
    stream = cast(TextIO, sink)
    configure_logging(level=args.log_level, fmt="json", secrets=[KEY], stream=stream)
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
    try:
        url = pipe.recv()
        with tempfile.TemporaryDirectory() as tmp:
            run = soak(args, url, f"sqlite:///{tmp}/soak.db")
    finally:
        pipe.send("stop")
        proc.join(10)
        threading.excepthook = previous_hook
    print(
        f"\n{args.tags:,} healthy and {len(run.hostile)} hostile tags for {args.minutes:g} min: "
        f"{len(run.runs):,} polls; daemon.stop() took {run.stop_seconds:.1f} s"
    )
    report_cadence(run)
    report_resources(run.samples)
    report_hostile(run)
    report_logs(run, sink, uncaught)


def soak(args: argparse.Namespace, url: str, db: str) -> Run:
    """Track every tag, run the daemon for ``args.minutes`` while sampling the process,
    stop it, and read back what it wrote."""
    settings = load_settings(
        {}, api_key=KEY, base_url=url, database_url=db, rate_limit_per_second=0, concurrency=4
    )
    healthy = [f"soak-{i:05d}" for i in range(args.tags)]
    hostile = hostile_tags(args.trickling)
    engine = create_engine(db)
    migrate.upgrade(engine)
    # The benchmark's own queries go through an engine whose SQL is never logged, so the
    # log lines counted (and searched for the key) are the daemon's.
    reader = sa.create_engine(db, logging_name="soak", poolclass=sa.pool.NullPool)
    logging.getLogger("sqlalchemy.engine.Engine.soak").setLevel(logging.WARNING)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        window = now + settings.report_window
        tracking.track_many(conn, [(tag, now, window) for tag in healthy + hostile], now=now)

    def clock() -> datetime:
        return datetime.now(UTC)

    holder: list[Daemon] = []
    health = Health(clock)
    samples: list[Sample] = []
    # Built as `run` builds it (daemon/commands.py), from the same settings.
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
            s.overdue = overdue(reader, clock() - LATE)
            samples.append(s)
            print(
                f"  +{s.at:4.0f} s  rss {s.rss:6.1f} MiB  threads {s.threads:3d}  "
                f"fds {s.fds:4d}  polls {s.polls:6,}  healthy tags overdue {s.overdue:4}  "
                f"{'ready' if not s.problems else 'NOT READY: ' + '; '.join(s.problems)}",
                flush=True,
            )
        stopped_at, stopping = clock(), time.monotonic()
        daemon.stop()
        stop_seconds = time.monotonic() - stopping

    run = Run(healthy, hostile, settings.cadence, started_at, stopped_at, stop_seconds, samples)
    engine.dispose()
    with reader.connect() as conn:
        columns = (poll_runs.c.tag, poll_runs.c.started_at, poll_runs.c.finished_at)
        run.runs = list(
            conn.execute(
                sa.select(*columns, poll_runs.c.outcome, poll_runs.c.error).order_by(
                    poll_runs.c.tag, poll_runs.c.started_at
                )
            )
        )
        run.tags = {r.tag: r for r in conn.execute(sa.select(tracked_tags))}
        counts = sa.select(delivery_statuses.c.tag, sa.func.count()).group_by(
            delivery_statuses.c.tag
        )
        run.numbers = Counter({tag: n for tag, n in conn.execute(counts)})
        statuses = sa.select(delivery_statuses.c.provider_status).where(
            delivery_statuses.c.tag.in_(hostile)
        )
        run.provider_statuses = [s for (s,) in conn.execute(statuses) if s]
    reader.dispose()
    return run


def holds_key(text: str | None) -> bool:
    """Whether ``text`` holds the key in any spelling (or the fragment)."""
    lowered = (text or "").lower()
    return any(needle in lowered for needle in key_spellings(KEY))


def report_cadence(run: Run) -> None:
    """How punctual the healthy tags' polls were: every interval between two polls of a
    tag against the tag's cadence then, and the one from its last poll to the stop (a
    tag no longer polled at all must show too)."""
    polls: dict[str, list[datetime]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    durations: list[float] = []
    for r in run.runs:
        if group_of(r.tag) == "healthy":
            polls[r.tag].append(r.started_at)
            outcomes[r.outcome] += 1
            durations.append((r.finished_at - r.started_at).total_seconds())
    gaps: list[float] = []  # seconds between two polls of a tag
    ratios: list[float] = []  # every wait for a poll (the last one too) over its cadence
    firsts: list[float] = []  # seconds from the daemon's start to a tag's first poll
    missed: set[str] = set()
    for tag in run.healthy:
        times = polls.get(tag, [])
        if not times:
            missed.add(tag)
            continue
        firsts.append((times[0] - run.started_at).total_seconds())
        waits = [(a, (b - a).total_seconds()) for a, b in itertools.pairwise(times)]
        gaps.extend(wait for _, wait in waits)
        if run.tags[tag].state == "active":
            waits.append((times[-1], (run.stopped_at - times[-1]).total_seconds()))
        for at, wait in waits:
            due = cadence_interval(at - run.tags[tag].sent_at, run.cadence).total_seconds()
            ratios.append(wait / due)
            if wait > MISSED * due:
                missed.add(tag)
    print(f"  healthy: {sum(outcomes.values()):,} polls {dict(outcomes)}")
    if durations:
        print(
            f"  one poll of a healthy tag, retries and their waits included: "
            f"{spread(durations, 2)} s"
        )
    if gaps:
        every = cadence_interval(timedelta(0), run.cadence).total_seconds()
        late = sum(1 for r in ratios if r > 1.5)
        print(
            f"  interval between polls of a healthy tag (cadence {every:g} s): "
            f"{spread(gaps)} s; {late:,} of {len(ratios):,} waits over 1.5× cadence"
        )
    if firsts:
        print(f"  first poll after start: {spread(firsts)} s")
    never = sum(1 for tag in run.healthy if tag not in polls)
    print(
        f"  healthy tags that missed a poll window (a wait over {MISSED:g}× cadence, or never "
        f"polled): {len(missed)} of {len(run.healthy):,} ({never} never polled)"
    )


def report_resources(samples: list[Sample]) -> None:
    """Whether RSS, threads and descriptors stayed flat, and readiness throughout. The
    first sample falls in the start-up backlog, so the series starts at the second."""
    steady = samples[1:] if len(samples) > 2 else samples
    if not steady:
        return
    first, last = steady[0], steady[-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def verdict(values: list[float], tolerance: float) -> str:
        if len(values) < 2:
            return "n/a"
        return "flat" if flat(values, tolerance) else "GROWING"

    rss = [s.rss for s in steady]
    fds = [float(s.fds) for s in steady]
    threads = [float(s.threads) for s in steady]
    print(
        f"  from +{first.at:.0f} s to +{last.at:.0f} s: rss {first.rss:.1f} → {last.rss:.1f} "
        f"MiB, max {max(rss):.1f} (process peak {peak:.1f}): "
        f"{verdict(rss, 0.05 * max(rss))}; threads {first.threads} → {last.threads}, max "
        f"{max(threads):.0f}: {verdict(threads, 0)}; open fds {first.fds} → {last.fds}, "
        f"max {max(fds):.0f}: {verdict(fds, 4)}"
    )
    ready = sum(1 for s in samples if not s.problems)
    worst = max(s.overdue for s in steady)
    print(
        f"  readiness: {ready} of {len(samples)} samples ready; healthy tags overdue by over "
        f"{LATE.total_seconds():g} s in a sample from +{first.at:.0f} s: at most {worst:,}"
    )


def report_hostile(run: Run) -> None:
    """What became of each hostile tag."""
    polls: dict[str, list[Any]] = defaultdict(list)
    for r in run.runs:
        polls[r.tag].append(r)
    print("  hostile tags (polls, outcomes, numbers stored, longest poll, last error):")
    for tag in run.hostile:
        mine = polls.get(tag, [])
        longest = max(((r.finished_at - r.started_at).total_seconds() for r in mine), default=0)
        error = run.tags[tag].last_error or "-"
        print(
            f"    {tag:17} {len(mine):3} {dict(Counter(r.outcome for r in mine))} "
            f"{run.numbers[tag]:5,} numbers, {longest:5.1f} s, "
            f"{'(holds the key)' if holds_key(error) else error[:110]}"
        )


def report_logs(run: Run, sink: LogSink, uncaught: list[str]) -> None:
    """The log events counted, and wherever the key showed."""
    count = sink.events
    print(
        f"  log lines: {sink.lines:,} ({dict(sink.levels)}); poll.crashed "
        f"{count['poll.crashed']} (must be 0), poll.failed {count['poll.failed']:,}, "
        f"api.item_skipped {count['api.item_skipped']:,}, api.item_coerced "
        f"{count['api.item_coerced']:,}, api.total_mismatch {count['api.total_mismatch']:,}; "
        f"uncaught thread exceptions {len(uncaught)}"
    )
    print("  events by name:", ", ".join(f"{e} {n:,}" for e, n in count.most_common()))
    for event, line in sink.examples.items():
        print(f"  first {event}: {line}")
    in_columns = sum(1 for r in run.runs if holds_key(r.error)) + sum(
        1 for t in run.tags.values() if holds_key(t.last_error)
    )
    leaks = sum(sink.leaks.values())
    print(
        f"  API key in any spelling: in {leaks} of {sink.lines:,} log lines"
        f"{' ' + str(dict(sink.leaks)) if leaks else ''}, in {in_columns} poll_runs.error / "
        f"tracked_tags.last_error values: {'NEVER SEEN' if not leaks + in_columns else 'LEAKED'}"
    )
    echoed = sum(1 for s in run.provider_statuses if holds_key(s))
    print(
        f"  (provider text: {echoed} delivery_statuses.provider_status value(s) "
        f"hold the key that {ECHO_ITEM_TAG}'s provider echoed in a status)"
    )


if __name__ == "__main__":
    main()
