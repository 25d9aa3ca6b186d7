"""Shared test helpers: the CLI in-process and as a process, the daemon as a process, the
process-wide state ``main()`` changes, and small waits and clocks.

Most tests run a verb through :func:`run_cli`, which calls ``daemon.cli.main(argv)`` in
this interpreter: the exit code, stdout and stderr are what a user's shell would see,
without paying Python's start and the verb's imports (~0.5 s) each time. A test whose
subject is the process itself (signals, SIGKILL, rlimits, dropped capabilities, broken
pipes, what a fresh interpreter imports) uses :func:`run_cli_process` or :class:`Running`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from daemon.health import Health
    from daemon.scheduler import Daemon
    from tests.integration.conftest import Rig

API_KEY = "k3y-Secret&/+é"  # needs URL encoding, and must never be printed


@dataclass
class CliResult:
    """What a CLI run printed and returned."""

    code: int
    out: str
    err: str


def assert_clean(*outputs: str) -> None:
    """No traceback and no spelling of the test key in any of ``outputs``."""
    for text in outputs:
        assert "Traceback" not in text
        assert API_KEY not in text
        assert "k3y-Secret" not in text


# --- process-wide state ---------------------------------------------------------------------

#: The stdlib loggers ``configure_logging`` sets a level on ("" is the root logger).
_BRIDGED = ("", "httpx", "httpcore", "sqlalchemy", "alembic", "apscheduler")


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Put back what ``main()`` configures for the whole process: structlog, the stdlib
    loggers' levels and handlers (pointing at a stream that is gone after the call), and
    the garbage collector's thresholds (``tune_gc``)."""
    saved = structlog.get_config()
    loggers = {name: logging.getLogger(name) for name in _BRIDGED}
    levels = {name: logger.level for name, logger in loggers.items()}
    handlers = list(loggers[""].handlers)
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        structlog.configure(**saved)
        for name, logger in loggers.items():
            logger.setLevel(levels[name])
        loggers[""].handlers[:] = handlers
        gc.set_threshold(*threshold)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Make ``os.environ`` exactly ``env`` for the block, as a child process would see it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- the CLI ----------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str], stdin: str = "", timeout: float = 0) -> CliResult:
    """Run ``smspartner-status ARGS`` in this interpreter through ``daemon.cli.main``.

    ``env`` is the whole environment the verb sees (as for a child process); ``stdin`` is
    what it reads there. argparse's exits (``--help``, a bad argument) become the code
    they carry. Logging and gc are restored afterwards. ``timeout`` is accepted for the
    callers written for :func:`run_cli_process`; pytest's per-test timeout covers it here.
    """
    from daemon.cli import main

    out, err = io.StringIO(), io.StringIO()
    with (
        environment(env),
        process_state_kept(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = _exit_code(exc)
        finally:
            sys.stdin = saved_stdin
    return CliResult(code, out.getvalue(), err.getvalue())


def _exit_code(exc: SystemExit) -> int:
    """The status a process exiting with ``exc`` would have (as ``sys.exit`` maps it)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_cli_process(
    *args: str,
    env: dict[str, str],
    timeout: float = 60,
    preexec_fn: Callable[[], None] | None = None,
    stdin: str | None = None,
) -> CliResult:
    """Run ``python -m daemon ARGS`` as a separate process, and capture everything.

    Only for tests whose subject is the process: ``preexec_fn`` runs in the child before
    the CLI starts (see :func:`as_service_user`).
    """
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=preexec_fn,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


#: The child of :func:`run_clis_as_service_user`: each run in-process, results as JSON.
_SERVICE_USER_CHILD = """
import json, sys
from tests.helpers import run_cli
runs = json.load(sys.stdin)
print(json.dumps([vars(run_cli(*args, env=env)) for args, env in runs]))
"""


def run_clis_as_service_user(
    runs: list[tuple[tuple[str, ...], dict[str, str]]], timeout: float = 60
) -> list[CliResult]:
    """Run each ``(args, env)`` as :func:`run_cli` does, in one child process that obeys
    file permissions (:func:`as_service_user`): the process is the subject only in that
    it lacks the capabilities, so one process serves every verb of a test."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SERVICE_USER_CHILD],
        input=json.dumps(runs),
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        preexec_fn=as_service_user,
    )
    return [CliResult(**result) for result in json.loads(proc.stdout)]


#: prctl(2) option and capabilities(7) numbers for :func:`as_service_user`.
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def as_service_user() -> None:
    """A ``preexec_fn`` that makes root obey file permissions, as a service user does.

    Tests often run as root (containers, CI), and root writes anywhere: drop the
    capabilities that bypass permission checks from the bounding set, so the CLI the
    child execs has none of them. A no-op for other users.

    Raises:
        OSError: the capabilities cannot be dropped (see :func:`permissions_apply`).
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def permissions_apply(target: Path) -> bool:
    """Whether a CLI run with :func:`as_service_user` is refused opening ``target`` for
    writing (a file that exists, or a new one in a directory)."""
    probe = [sys.executable, "-c", f"open({str(target)!r}, 'a')"]
    try:
        proc = subprocess.run(probe, preexec_fn=as_service_user, capture_output=True, check=False)
    except subprocess.SubprocessError:  # the capabilities could not be dropped
        return False
    return proc.returncode != 0 and b"PermissionError" in proc.stderr


# --- the daemon in-process, stepped with the rig's clock -----------------------------------


def daemon_for(r: Rig, health: Health | None = None, *, concurrency: int = 1) -> Daemon:
    """A daemon built through the rig's App, on its clock; its dispatcher is never started:
    the test calls :func:`step` after moving ``r.clock``. Stop it (the ``stopping`` fixture)."""
    return r.daemon(health, concurrency=concurrency)


def step(daemon: Daemon) -> None:
    """One dispatch, and every poll it leads to (the worker claims what else is due)."""
    daemon.dispatch()
    deadline = time.monotonic() + 15
    while daemon.polls_in_flight:
        assert time.monotonic() < deadline, "the daemon kept polling: a tag is re-polled at once"
        time.sleep(0.01)


# --- the daemon as a process ------------------------------------------------------------------


class Running:
    """A `run` daemon in a subprocess, its log lines in a file (signals, SIGKILL, the
    single-writer lock between processes, sd_notify)."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", *args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[str]:
        """The log lines written so far."""
        return self.log.read_text().splitlines()

    def events(self) -> list[dict[str, object]]:
        """The JSON log events written so far (other lines skipped)."""
        found = []
        for line in self.lines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``sig``; the exit code and how long the process took to exit."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=20)
        finally:
            self._out.close()
        return code, time.monotonic() - start

    def close(self) -> None:
        """Kill the process if it still runs, and close its log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


class Dispatches:
    """A `run` process's dispatcher passes, seen through sd_notify: the daemon sends
    ``WATCHDOG=1`` at the start of each, to ``NOTIFY_SOCKET`` (:meth:`env`).

    Lets a test wait for "one more look" by a daemon instead of sleeping through its
    2-second dispatch interval.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))

    def env(self) -> dict[str, str]:
        """What the daemon's environment needs to report here."""
        return {"NOTIFY_SOCKET": str(self.path)}

    def wait_next(self, timeout: float = 10) -> None:
        """Return once a pass that began after this call has claimed what was due.

        A pass sends WATCHDOG=1 before it claims, and submits what it claimed at once;
        0.2 s after the message, a tag it claimed is being fetched.
        """
        self._sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv(256)  # passes that began before this call
        self._sock.settimeout(timeout)
        while self._sock.recv(256) != b"WATCHDOG=1":
            pass
        time.sleep(0.2)

    def close(self) -> None:
        """Stop listening."""
        self._sock.close()


# --- small things -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` every 0.05 s until it is true; fail naming ``what`` after
    ``timeout`` seconds. For a process's doing only: in-process, step with a clock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def unix(dt: datetime) -> str:
    """A provider ``date``: Unix seconds as a string."""
    return str(int(dt.timestamp()))


#: ``count`` numbers under one tag in one statement, on either engine: +33610000000
#: upwards; every tenth still waiting (no ``resolved_at``), every hundredth a STOP.
_FILL_NUMBERS = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :count)
INSERT INTO delivery_statuses (tag, phone_number, status, provider_status, stop_sms,
                               reported_at, first_seen_at, resolved_at, updated_at)
SELECT :tag, '+336' || CAST(10000000 + i AS TEXT),
       CASE WHEN i % 10 = 0 THEN 'waiting' ELSE 'delivered' END,
       CASE WHEN i % 10 = 0 THEN 'Waiting' ELSE 'Delivered' END,
       i % 100 = 0, :now, :now, CASE WHEN i % 10 = 0 THEN NULL ELSE :now END, :now
FROM n
"""


def fill_numbers(conn: Connection, tag: str, count: int, now: datetime) -> None:
    """Write ``count`` numbers of an already tracked ``tag``, generated by the database
    itself: a second or two for 100,000 rows, where inserting them from Python takes
    many times that (CSV export tests and benchmark)."""
    import sqlalchemy as sa

    from daemon.db import UtcDateTime

    query = sa.text(_FILL_NUMBERS).bindparams(sa.bindparam("now", now, type_=UtcDateTime()))
    conn.execute(query, {"tag": tag, "count": count})


@dataclass
class Peak:
    """A command's run as a process: its own peak RSS, wall time, lines it printed."""

    rss_mb: float
    seconds: float
    lines: int


#: Runs a command and reports its peak RSS. Linux keeps a process's peak across exec,
#: and a child spawned straight from a test or benchmark (vfork, or fork) would carry
#: that process's peak (SQLAlchemy loaded, 100,000s of rows written): every command
#: measured that way showed the same 72 MB. A small launcher (``-S``, ``os`` only,
#: ~8 MB) spawns the command instead, so what ``wait4`` reports is the command's own
#: peak (unless that is below the launcher's, which ``/bin/true`` measures).
_LAUNCHER = """
import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
os.write(2, b"maxrss=%d\\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(argv: list[str], env: dict[str, str]) -> Peak:
    """Run ``argv`` (an absolute program path first) as a process, count the lines of
    its stdout, and read its peak RSS (``ru_maxrss`` from ``wait4``; kB on Linux).

    Raises:
        AssertionError: the command exited non-zero.
    """
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, *argv],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        lines = 0
        while chunk := proc.stdout.read(1 << 16):
            lines += chunk.count(b"\n")
        err = proc.stderr.read().decode()
        code = proc.wait()
    seconds = time.monotonic() - started
    if code != 0 or "maxrss=" not in err:
        raise AssertionError(f"{argv[1:]}: exit {code}: {err}")
    return Peak(int(err.rsplit("maxrss=", 1)[1]) / 1024, seconds, lines)


#: Triggers that make the database refuse some rows of a table: the way an unforeseen
#: value, a bug or a constraint makes a statement fail, from real parts.
_REFUSE_ROWS = {
    "sqlite": [
        "CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN NEW.{column} = '{value}'"
        " BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.{column} = '{value}' THEN RAISE EXCEPTION 'poisoned row'; END IF;"
        " RETURN NEW; END $$",
        "CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table}"
        " FOR EACH ROW EXECUTE FUNCTION refuse_{table}()",
    ],
}


def refuse_rows(engine: Engine, table: str, column: str, value: str) -> None:
    """Make every INSERT into ``table`` whose ``column`` is ``value`` fail ('poisoned row')."""
    with engine.begin() as conn:
        for statement in _REFUSE_ROWS[conn.dialect.name]:
            conn.exec_driver_sql(statement.format(table=table, column=column, value=value))
