"""Benchmark: how long the short ``smspartner-status`` commands take, whole process.

Each command is timed from spawn to exit, next to the stdlib floor measured in the same
run (``python -c "import argparse, json, sqlite3, urllib.request, logging"``: what any
Python command line of this kind pays before doing anything):

* ``--help``;
* ``check`` with no daemon running (exit 1, the unhealthy answer: timed all the same);
* ``check`` with a fresh heartbeat, written by the benchmark before each run where the
  daemon would write it (exit 0, what a container's HEALTHCHECK sees every interval);
* ``tags`` on an empty SQLite database, migrated once beforehand;
* ``poll TAG`` of an empty tag: a fast loopback server answers code 4 ("message not
  found"), so the time is start-up, the database's opening and one request.

The runs are interleaved round-robin, each round starting one command further along, so
that a machine busy with other work slows every command alike; one untimed run of each
warms the caches first. A command's ratio is the median of its runs' ratios to the floor
of the same round, steadier than a ratio of medians while the machine's speed drifts.
Goals (issue 18): ``--help`` ≤ 3× the floor, ``check`` ≤ 6×.

The heartbeat lives in ``$RUNTIME_DIRECTORY`` (else ``$XDG_RUNTIME_DIR``) in newer
versions and in the temporary directory before: the benchmark points all three
(``TMPDIR`` too) at one private directory, so the file it writes is where either layout
looks, and it checks that ``check`` says healthy before timing it.

Run:  .venv/bin/python -m tests.benchmarks.startup [--runs 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks.pageserver import KEY, PageServer

FLOOR = "import argparse, json, sqlite3, urllib.request, logging"
GOALS = {"--help": 3.0, "check, no daemon": 6.0, "check, fresh heartbeat": 6.0}


class Command:
    """One command line to time, with its environment and the exit code it must give."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        *,
        code: int = 0,
        expect: str = "",
        before: Callable[[], None] | None = None,
    ) -> None:
        self.name, self.argv, self.env, self.code, self.expect = name, argv, env, code, expect
        self.before = before  # called before each run (writes the heartbeat)
        self.times: list[float] = []

    def run(self, cwd: Path) -> float:
        """Run once; return the wall time, after checking the exit code and output."""
        if self.before is not None:
            self.before()
        start = time.perf_counter()
        done = subprocess.run(self.argv, env=self.env, cwd=cwd, capture_output=True, check=False)
        elapsed = time.perf_counter() - start
        output = done.stdout.decode() + done.stderr.decode()
        if done.returncode != self.code or self.expect not in output:
            raise SystemExit(
                f"{self.name}: exit {done.returncode} (expected {self.code}), output:\n{output}"
            )
        return elapsed


def base_env(runtime: Path) -> dict[str, str]:
    """This environment without SMSPARTNER_* or proxies, heartbeat dirs at ``runtime``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SMSPARTNER_") and "proxy" not in k.lower()
    }
    env.update(RUNTIME_DIRECTORY=str(runtime), XDG_RUNTIME_DIR=str(runtime), TMPDIR=str(runtime))
    return env


def heartbeat_writer(runtime: Path, database_url: str) -> Callable[[], None]:
    """A function that writes a heartbeat of now where ``check`` looks for this database."""
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    path = runtime / f"smspartner-status-{digest}.heartbeat"

    def write() -> None:
        path.write_text(datetime.now(UTC).isoformat(), encoding="utf-8")

    return write


def commands(tmp: Path, server_url: str) -> list[Command]:
    """The commands of the benchmark, each with its own database URL."""
    runtime = tmp / "run"
    runtime.mkdir(mode=0o700)
    script = str(Path(sys.executable).with_name("smspartner-status"))
    env = base_env(runtime)

    def with_db(name: str, **extra: str) -> dict[str, str]:
        return {**env, "SMSPARTNER_DATABASE_URL": f"sqlite:///{tmp / name}", **extra}

    beat_url = f"sqlite:///{tmp / 'beating.db'}"
    return [
        Command("python floor", [sys.executable, "-c", FLOOR], env),
        Command("--help", [script, "--help"], env, expect="usage:"),
        Command(
            "check, no daemon",
            [script, "check"],
            with_db("nodaemon.db"),
            code=1,
            expect="unhealthy",
        ),
        Command(
            "check, fresh heartbeat",
            [script, "check"],
            with_db("beating.db"),
            expect="healthy: last heartbeat",
            before=heartbeat_writer(runtime, beat_url),
        ),
        Command("tags", [script, "tags"], with_db("tags.db")),
        Command(
            "poll, empty tag",
            [script, "poll", "empty"],
            with_db(
                "poll.db",
                SMSPARTNER_API_KEY=KEY,
                SMSPARTNER_BASE_URL=server_url,
                SMSPARTNER_RATE_LIMIT_PER_SECOND="0",
            ),
            expect="no messages under this tag yet",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each command")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, PageServer(0) as server:
        cmds = commands(Path(tmp), server.url)
        for cmd in cmds:  # warm-up: migrates the databases, fills the caches, checks answers
            cmd.run(Path(tmp))
        for run in range(args.runs):
            for i in range(len(cmds)):
                cmd = cmds[(run + i) % len(cmds)]
                cmd.times.append(cmd.run(Path(tmp)))

    floor = cmds[0].times
    print(
        f"whole-process wall times, median (range) of {args.runs} interleaved runs; "
        "x floor: median of the runs' ratios to the floor of the same run"
    )
    for cmd in cmds:
        ratio = statistics.median(t / f for t, f in zip(cmd.times, floor, strict=True))
        goal = GOALS.get(cmd.name)
        note = f"  (goal <= {goal:g}x)" if goal else ""
        print(
            f"  {cmd.name:<24} {statistics.median(cmd.times) * 1000:6.0f} ms "
            f"({min(cmd.times) * 1000:.0f}–{max(cmd.times) * 1000:.0f})  "
            f"{ratio:5.2f}x floor{note}"
        )


if __name__ == "__main__":
    main()
