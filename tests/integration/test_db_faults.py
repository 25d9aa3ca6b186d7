"""Database faults: a locked SQLite file is waited for, a full disk fails the poll with
one clear line and commits nothing, and the next poll repairs everything."""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.simulator import Simulator
from tests.helpers import API_KEY, run_cli


def count_rows(db: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM delivery_statuses").fetchone()[0])


def test_a_locked_sqlite_file_is_waited_for_not_failed(
    cli_env: dict[str, str], simulator: Simulator
) -> None:
    simulator.add_tag("busy", 200)
    assert run_cli("track", "busy", env=cli_env).code == 0
    db = cli_env["SMSPARTNER_DATABASE_URL"].removeprefix("sqlite:///")
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock …
    release = threading.Timer(2.0, holder.execute, args=("COMMIT",))
    release.start()  # … for two seconds
    started = time.monotonic()
    res = run_cli("poll", "busy", env=cli_env)
    release.join()
    holder.close()
    assert res.code == 0, res.err
    assert time.monotonic() - started >= 1.5
    assert count_rows(db) == 200


def test_a_full_disk_fails_the_poll_cleanly_and_commits_nothing(
    cli_env: dict[str, str], simulator: Simulator
) -> None:
    simulator.add_tag("full", 30_000, page_size=1000)
    assert run_cli("track", "full", env=cli_env).code == 0
    db = cli_env["SMSPARTNER_DATABASE_URL"].removeprefix("sqlite:///")
    limit = os.path.getsize(db) + 256 * 1024  # the poll needs several MB

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "poll", "full"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_disk,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and API_KEY not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "database" in error_lines[0]
    assert count_rows(db) == 0  # nothing of the failed poll was committed
    res = run_cli("poll", "full", env=cli_env, timeout=120)  # space again: repaired
    assert res.code == 0, res.err
    assert count_rows(db) == 30_000
    assert Path(db).stat().st_size > limit
