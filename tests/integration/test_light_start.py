"""A verb imports what it uses: ``--help``, a bad argument and ``check`` start without
SQLAlchemy, Alembic, httpx, APScheduler or prometheus-client, and ``poll`` without the
daemon's parts.

Structural, not timed: each command runs in a fresh interpreter (the process is the
subject: what it imported), which reports ``sys.modules`` when ``main`` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.health import heartbeat_path
from daemon.simulator import Simulator

#: What a short command must never import (top-level package names).
HEAVY = frozenset({"sqlalchemy", "alembic", "httpx", "apscheduler", "prometheus_client"})

_PROBE = """
import json, sys
from daemon.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""


def _imports(tmp_path: Path, env: dict[str, str], *argv: str) -> tuple[int, set[str]]:
    """Run ``main(argv)`` in a fresh interpreter; its exit code and every module it
    imported (top-level packages and our own modules by full name)."""
    report = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", _PROBE, str(report), *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        check=False,
        timeout=60,
    )
    found = json.loads(report.read_text())
    modules = {m.split(".")[0] for m in found["modules"]} | set(found["modules"])
    return int(found["code"] or 0), modules


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """No SMSPARTNER_* of the developer; the heartbeat in a private directory here."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")}
    clean.update(
        RUNTIME_DIRECTORY=str(runtime), SMSPARTNER_DATABASE_URL=f"sqlite:///{tmp_path}/x.db"
    )
    return clean


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        (["poll", "--help"], 0),
        (["frobnicate"], 2),  # no such verb
        (["untrack"], 2),  # TAG missing
        (["track", "has space"], 2),  # a bad TAG
        (["prune", "--events-older-than", "soon"], 2),
    ],
)
def test_help_and_argument_errors_import_nothing_heavy(
    tmp_path: Path, env: dict[str, str], argv: list[str], code: int
) -> None:
    exit_code, modules = _imports(tmp_path, env, *argv)
    assert exit_code == code
    assert not modules & HEAVY
    assert not {"pydantic", "pydantic_settings", "structlog"} & modules


def test_check_imports_nothing_heavy_healthy_or_not(tmp_path: Path, env: dict[str, str]) -> None:
    code, modules = _imports(tmp_path, env, "check")
    assert code == 1  # no daemon: unhealthy
    assert not modules & HEAVY
    # Nor the settings object: the database URL is read as it would read it.
    assert not {"pydantic", "pydantic_settings", "daemon.settings"} & modules

    beat = heartbeat_path(env["SMSPARTNER_DATABASE_URL"], env)
    beat.write_text(datetime.now(UTC).isoformat())
    code, modules = _imports(tmp_path, env, "check")
    assert code == 0
    assert not modules & HEAVY


def test_check_finds_the_heartbeat_of_a_database_url_read_from_a_file(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """``check`` reads the URL where the daemon would: here SMSPARTNER_DATABASE_URL_FILE."""
    url = f"sqlite:///{tmp_path}/from-file.db"
    (tmp_path / "db_url").write_text(url + "\n")
    del env["SMSPARTNER_DATABASE_URL"]
    env["SMSPARTNER_DATABASE_URL_FILE"] = str(tmp_path / "db_url")
    heartbeat_path(url, env).write_text(datetime.now(UTC).isoformat())
    code, modules = _imports(tmp_path, env, "check")
    assert code == 0 and not modules & HEAVY


def test_tags_and_poll_import_only_what_they_use(
    tmp_path: Path, env: dict[str, str], simulator: Simulator
) -> None:
    """``tags`` needs no HTTP client; ``poll`` no scheduler, metrics, retention,
    simulator, nor Alembic once the database is at head, and on SQLite neither
    SQLAlchemy's ORM nor its PostgreSQL dialect."""
    from tests.conftest import API_KEY

    simulator.add_tag("t", 5)
    env.update(
        SMSPARTNER_API_KEY=API_KEY,
        SMSPARTNER_BASE_URL=simulator.url,
        SMSPARTNER_RATE_LIMIT_PER_SECOND="0",
    )
    code, modules = _imports(tmp_path, env, "track", "t")  # migrates the new database
    assert code == 0 and "alembic" in modules

    code, modules = _imports(tmp_path, env, "tags")
    assert code == 0
    assert not {"alembic", "httpx", "apscheduler", "prometheus_client"} & modules

    code, modules = _imports(tmp_path, env, "poll", "t")
    assert code == 0
    assert not {"alembic", "apscheduler", "prometheus_client"} & modules
    assert not {"daemon.scheduler", "daemon.metrics", "daemon.retention"} & modules
    assert not {"daemon.simulator", "daemon.http"} & modules
    # Core tables need no ORM, and a SQLite poll no PostgreSQL dialect.
    assert not {"sqlalchemy.orm", "sqlalchemy.dialects.postgresql"} & modules
