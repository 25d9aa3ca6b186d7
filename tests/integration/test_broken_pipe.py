"""A listing piped into a reader that stops early (``… | head -1``) ends quietly.

The process is the subject here (its exit status, what it prints to stderr as the
interpreter shuts down), so the CLI runs as a subprocess whose stdout we close.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon import migrate
from daemon.db import create_engine, delivery_statuses, stop_sms_optouts, tracked_tags

#: Rows per listing: some 400 kB of text, far more than a pipe buffers (64 kB), so the
#: CLI is still writing when its reader goes away.
ROWS = 5000
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def full_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite file with thousands of tags, numbers and opt-outs, written directly."""
    url = f"sqlite:///{tmp_path_factory.mktemp('pipe') / 'pipe.db'}"
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            tags = [{"tag": "spring"}, *({"tag": f"tag-{i:05d}"} for i in range(ROWS))]
            conn.execute(
                sa.insert(tracked_tags),
                [{**t, "sent_at": NOW, "window_ends_at": NOW + timedelta(2)} for t in tags],
            )
            numbers = [f"+336{i:08d}" for i in range(ROWS)]
            conn.execute(
                sa.insert(delivery_statuses),
                [
                    {
                        "tag": "spring",
                        "phone_number": phone,
                        "status": "delivered",
                        "provider_status": "Delivered",
                        "stop_sms": True,
                        "reported_at": NOW,
                        "first_seen_at": NOW,
                        "resolved_at": NOW,
                        "updated_at": NOW,
                    }
                    for phone in numbers
                ],
            )
            conn.execute(
                sa.insert(stop_sms_optouts),
                [
                    {
                        "phone_number": phone,
                        "tag": "spring",
                        "reported_at": NOW,
                        "first_seen_at": NOW,
                    }
                    for phone in numbers
                ],
            )
    finally:
        engine.dispose()
    return url


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "spring", "--numbers"],
        ["optouts"],
        ["tags"],
        ["report", "spring", "--numbers", "--csv"],
        ["optouts", "--csv"],
        ["tags", "--csv"],
    ],
    ids=["report-numbers", "optouts", "tags", "report-numbers-csv", "optouts-csv", "tags-csv"],
)
def test_a_listing_whose_reader_stops_early_ends_quietly(
    argv: list[str], full_database: str, tmp_path: Path
) -> None:
    # Buffered stdout, as for any user: Python then also flushes at exit, into the pipe.
    drop = ("SMSPARTNER_", "PYTHONUNBUFFERED")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(SMSPARTNER_DATABASE_URL=full_database, SMSPARTNER_LOG_FORMAT="json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", *argv],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # `| head -1`: one line, then the reader is gone
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    code = proc.wait(timeout=60)
    assert first.strip()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "Exception ignored" not in err, err
    assert code in (0, 141), err
