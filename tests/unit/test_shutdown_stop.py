"""The stop a run hands out, and the constants kept in light modules so that a start
stays light (each must equal the heavy module's truth)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from daemon import cli, migrate, retention, sources
from daemon.settings import load_settings
from daemon.shutdown import Shutdown

KEY = "unit-test-key-0001"


def test_the_shutdown_sets_its_deadline_before_waking_sleepers() -> None:
    shutdown = Shutdown(grace=8.0, monotonic=lambda: 100.0)
    assert (shutdown.stopping, shutdown.deadline()) == (False, None)
    woke: list[float | None] = []

    def sleeper() -> None:
        shutdown.sleep(30)
        woke.append(shutdown.deadline())  # what a woken poll reads first

    thread = threading.Thread(target=sleeper)
    thread.start()
    assert shutdown.begin() is True
    thread.join(timeout=5)
    assert woke == [108.0]
    assert shutdown.begin() is False  # a second signal changes nothing
    assert (shutdown.stopping, shutdown.deadline()) == (True, 108.0)


def test_a_sleep_once_stopping_is_a_plain_sleep() -> None:
    """The client sleeps the rest of a wait that still ends before the deadline."""
    shutdown = Shutdown()
    shutdown.begin()
    started = time.monotonic()
    shutdown.sleep(0.05)
    assert time.monotonic() - started >= 0.04


def test_head_revision_is_the_newest_migration() -> None:
    """Commands skip Alembic when the database is at HEAD_REVISION: it must be the head
    of migrations/versions, or a new revision would never be applied."""
    assert migrate.script_head() == migrate.HEAD_REVISION


def test_the_parser_knows_the_prune_batch_size_of_retention() -> None:
    assert cli.PRUNE_BATCH_SIZE == retention.DEFAULT_BATCH_SIZE


@pytest.mark.parametrize(
    "where", ["default", "environment", "lowercase", "file", "credentials", "dotenv"]
)
def test_check_reads_the_database_url_the_settings_read(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check`` finds the daemon's heartbeat by the URL: both must read the same one."""
    url = f"sqlite:///{tmp_path / where}.db"
    if where == "environment":
        monkeypatch.setenv("SMSPARTNER_DATABASE_URL", url)
    elif where == "lowercase":
        monkeypatch.setenv("smspartner_database_url", url)
    elif where == "file":
        (tmp_path / "url").write_text(url + "\n")
        monkeypatch.setenv("SMSPARTNER_DATABASE_URL_FILE", str(tmp_path / "url"))
    elif where == "credentials":
        (tmp_path / "database_url").write_text(url)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    elif where == "dotenv":
        (tmp_path / ".env").write_text(f"SMSPARTNER_DATABASE_URL={url}\n")
    assert sources.database_url() == load_settings().database_url.get_secret_value()
