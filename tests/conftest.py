"""Shared fixtures: a clean environment, real databases (SQLite files and a throwaway
PostgreSQL cluster), the simulator on loopback, and the CLI's environment. Helpers that
are not fixtures live in tests/helpers.py."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from daemon.simulator import Simulator
from tests.helpers import (  # noqa: F401  (API_KEY, CliResult, run_cli: older imports)
    API_KEY,
    CliResult,
    process_state_kept,
    run_cli,
)

# Read before the environment is scrubbed: these configure the test run itself.
_PG_URL = os.environ.get("SMSPARTNER_TEST_POSTGRES_URL")
_PG_REQUIRED = os.environ.get("SMSPARTNER_TEST_REQUIRE_POSTGRES") == "1"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer's SMSPARTNER_* or .env can leak into a test."""
    for name in list(os.environ):
        if name.startswith("SMSPARTNER_") or name in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# --- PostgreSQL -------------------------------------------------------------------------


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgServer:
    """A running PostgreSQL server the tests may create databases in."""

    admin_url: str
    datadir: Path | None = None
    pg_ctl: str | None = None
    user: str | None = None

    def url(self, database: str) -> str:
        """URL of one database on this server."""
        return str(sa.make_url(self.admin_url).set(database=database))

    def ctl(self, *args: str) -> None:
        """Run pg_ctl against the throwaway cluster (restart tests)."""
        assert self.pg_ctl and self.datadir
        subprocess.run(
            [self.pg_ctl, "-D", str(self.datadir), "-w", "-l", str(self.datadir / "log"), *args],
            check=True,
            capture_output=True,
            user=self.user,
        )


def _start_cluster(base: Path) -> PgServer:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise FileNotFoundError("initdb/pg_ctl not found (install the postgresql package)")
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = "postgres" if _user_exists("postgres") else "nobody"
        shutil.chown(base, user=user)
    datadir, port = base / "data", _free_port()
    subprocess.run(
        [initdb, "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
        user=user,
    )
    options = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    server = PgServer(
        admin_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
        datadir=datadir,
        pg_ctl=pg_ctl,
        user=user,
    )
    server.ctl("-o", options, "start")
    return server


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server: SMSPARTNER_TEST_POSTGRES_URL, or a throwaway cluster."""
    if _PG_URL:
        yield PgServer(admin_url=_PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        return
    base = Path(tempfile.mkdtemp(prefix="smspartner-pg-"))
    base.chmod(0o755)
    try:
        server = _start_cluster(base)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        message = f"no PostgreSQL server for tests: {exc} {detail.decode(errors='replace')}"
        if _PG_REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield server
    finally:
        server.ctl("-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


_db_names = itertools.count()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each engine: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    with pg_database(request.getfixturevalue("pg_server")) as url:
        yield url


@contextmanager
def pg_database(server: PgServer) -> Iterator[str]:
    """Create a fresh database on ``server``; yield its URL; drop it afterwards."""
    name = f"t{os.getpid()}_{next(_db_names)}"
    # No pool: a test may restart the server, which kills any pooled connection.
    admin = sa.create_engine(
        server.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.url(name).replace("+psycopg", "")
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- simulator and CLI ------------------------------------------------------------------------


@pytest.fixture
def debug_logs() -> Iterator[None]:
    """Let debug events through whatever level another test configured, then restore."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that call ``daemon.cli.main`` themselves: it configures logging and the
    garbage collector for the whole process; put both back afterwards."""
    with process_state_kept():
        yield


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """The bundled fake SMS Partner API on a free loopback port, with our test key."""
    with Simulator(api_key=API_KEY, seed=7, page_size=500) as sim:
        yield sim


@pytest.fixture
def cli_env(tmp_path: Path, simulator: Simulator) -> dict[str, str]:
    """Environment for running the CLI against the simulator and a SQLite file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")}
    env.update(
        SMSPARTNER_API_KEY=API_KEY,
        SMSPARTNER_BASE_URL=simulator.url,
        SMSPARTNER_DATABASE_URL=f"sqlite:///{tmp_path / 'cli.db'}",
        SMSPARTNER_RETRY_BACKOFF_SECONDS="0.01",
        SMSPARTNER_RATE_LIMIT_PER_SECOND="0",
        SMSPARTNER_LOG_FORMAT="json",
    )
    return env
