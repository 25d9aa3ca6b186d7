"""Benchmark: API calls and report latency of the poll cadence over 48 hours, 1,000 tags.

Virtual time, no waiting, no HTTP: each tag's numbers get report delays from the
simulator's own realistic distribution (``Simulator._draw_report``: most within a
minute, a tail over hours, ~3 % never). Two pollers run over the same data:

* ours: the daemon's schedule — ``status.next_poll_at`` with the default cadence, the
  last poll pinned to the window's end, completion by ``status.is_complete`` after the
  settle period, plus the dispatcher's tick (up to 2 s) before each poll;
* baseline: a fixed 1-minute poller that stops when nothing is Waiting (or at 48 h).

A poll costs ceil(numbers / page size) API calls. Delay = time between a report becoming
available and the first poll that stores it. Goal (issue): ours ≤ 1/10 of the baseline's
API calls, median delay ≤ 2 min for reports that arrive in the first hour.

Run:  .venv/bin/python -m tests.benchmarks.cadence_48h [--tags 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from daemon.settings import Settings, load_settings
from daemon.simulator import Simulator
from daemon.status import is_complete, next_poll_at

T0 = datetime(2026, 11, 26, tzinfo=UTC)
PAGE_SIZE = 500
DISPATCH_TICK = timedelta(seconds=2)


@dataclass
class Outcome:
    """What one poller did for one tag."""

    calls: int
    delays: list[float]  # seconds, for reports arriving within the first hour


def draw_tag(rng: random.Random) -> list[float]:
    """Report delays (seconds; inf = never) of one campaign of realistic size."""
    size = int(rng.choice([50, 200, 500, 1000, 2500, 5000]) * rng.uniform(0.5, 1.5))
    return sorted(Simulator._draw_report(rng)[0] for _ in range(size))


def replay(delays: list[float], poll_times: Callable[[list[float]], list[float]]) -> Outcome:
    """Count calls and first-hour latencies for a sequence of poll times (seconds)."""
    times = poll_times(delays)
    pages = max(1, math.ceil(len(delays) / PAGE_SIZE))
    latencies = []
    for delay in delays:  # sorted
        if delay >= 3600:
            break
        i = bisect.bisect_left(times, delay)
        if i < len(times):
            latencies.append(times[i] - delay)
    return Outcome(calls=len(times) * pages, delays=latencies)


def ours(settings: Settings) -> Callable[[list[float]], list[float]]:
    """The daemon's schedule for one tag sent at T0 and tracked at once."""
    window_end = T0 + settings.report_window

    def times(delays: list[float]) -> list[float]:
        now, out = T0 + DISPATCH_TICK, []
        while True:
            out.append((now - T0).total_seconds())
            elapsed = out[-1]
            pending = len(delays) - bisect.bisect_right(delays, elapsed)
            if now >= window_end:
                break  # the last poll: pending numbers expire, the tag is done
            if is_complete(
                total=len(delays), pending=pending, sent_at=T0, now=now, settle=settings.settle
            ):
                break
            now = (
                next_poll_at(
                    sent_at=T0, window_ends_at=window_end, now=now, cadence=settings.cadence
                )
                + DISPATCH_TICK
            )
        return out

    return times


def every_minute(delays: list[float]) -> list[float]:
    """Baseline: poll every minute until nothing is Waiting or the window closes."""
    out, t = [], 0.0
    while t <= 48 * 3600:
        out.append(t)
        if delays[-1] <= t:  # sorted: the last report has arrived
            break
        t += 60
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    settings = load_settings({})
    rng = random.Random(args.seed)
    tags = [draw_tag(rng) for _ in range(args.tags)]
    our_runs = [replay(d, ours(settings)) for d in tags]
    base_runs = [replay(d, every_minute) for d in tags]

    our_calls = sum(o.calls for o in our_runs)
    base_calls = sum(o.calls for o in base_runs)
    our_delay = statistics.median(x for o in our_runs for x in o.delays)
    base_delay = statistics.median(x for o in base_runs for x in o.delays)
    numbers = sum(len(d) for d in tags)
    print(f"{args.tags:,} tags, {numbers:,} numbers, 48 simulated hours, pages of {PAGE_SIZE}")
    print(
        f"  baseline (every minute until nothing waits): {base_calls:>9,} API calls, "
        f"median first-hour delay {base_delay:6.1f} s"
    )
    print(
        f"  ours (cadence {settings.poll_cadence}):       {our_calls:>9,} API calls, "
        f"median first-hour delay {our_delay:6.1f} s"
    )
    print(
        f"  ratio: {our_calls / base_calls:.3f} of the baseline's calls (goal <= 0.100); "
        f"median delay {our_delay / 60:.2f} min (goal <= 2 min)"
    )


if __name__ == "__main__":
    main()
