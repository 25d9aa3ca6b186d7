"""The command line against a hostile world (issue 17, findings 6, 8, 10 and 11): a
heartbeat someone else can reach, input that used to overflow or grow without limit,
provider text full of terminal escapes, a send time in the far future, an in-memory
database, and a second path to a database file another `run` holds.

Verbs run in-process through ``daemon.cli.main(argv)``; a subprocess only where a
second process is the subject (SQLite's locks are per process).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from daemon import migrate, queries, tracking
from daemon.cli import main
from daemon.db import create_engine, release_run_lock, sqlite_run_lock
from daemon.errors import DatabaseBusyError, InputError
from daemon.health import (
    Health,
    HeartbeatDirError,
    heartbeat_age,
    heartbeat_dir,
    heartbeat_path,
    write_heartbeat,
)
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.settings import load_settings
from tests.helpers import API_KEY

# --- helpers ------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("restore_logging")  # verbs call main() here


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A SQLite database and a private runtime directory, as systemd would give one;
    returns the database file."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    database = tmp_path / "state" / "status.db"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    monkeypatch.setenv("SMSPARTNER_DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.setenv("SMSPARTNER_API_KEY", API_KEY)
    monkeypatch.setenv("SMSPARTNER_LOG_FORMAT", "json")
    return database


def one_error_line(err: str) -> str:
    """The single ``error: …`` line a failed verb prints, and nothing else."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- finding 6: a private heartbeat ---------------------------------------------------------


def test_a_symlink_planted_in_the_heartbeat_directory_is_never_followed(tmp_path: Path) -> None:
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = private / "db.heartbeat"
    # At the temporary name the writer uses, and at the heartbeat's own name.
    (private / f"{path.name}.{os.getpid()}.tmp").symlink_to(victim)
    path.symlink_to(victim)
    now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    assert heartbeat_age(path, now) is None  # reading does not follow it either

    write_heartbeat(path, now)

    assert victim.read_text() == "precious"
    assert not path.is_symlink() and path.read_text() == now.isoformat()
    assert heartbeat_age(path, now + timedelta(seconds=3)) == timedelta(seconds=3)


def test_the_heartbeat_directory_is_created_private_when_there_is_no_runtime_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = heartbeat_path("sqlite:///x.db")
    assert path.parent == tmp_path / f"smspartner-status-{os.geteuid()}"

    write_heartbeat(path, datetime.now(UTC))

    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert "x.db" not in path.name  # the URL (maybe a password) is hashed
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert heartbeat_dir() == tmp_path / "xdg"
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert heartbeat_dir() == tmp_path / "a"


@pytest.mark.parametrize("kind", ["writable by others", "a symlink", "another user's"])
def test_a_heartbeat_directory_that_is_not_private_is_refused(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    runtime = Path(os.environ["RUNTIME_DIRECTORY"])
    if kind == "writable by others":
        runtime.chmod(0o777)
        expected = "is writable by other users (mode 0777)"
    elif kind == "a symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        runtime.rmdir()
        runtime.symlink_to(real)
        expected = "is a symlink"
    else:
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory to another user")
        os.chown(runtime, 65534, 65534)
        expected = "is owned by uid 65534, not by this user (uid 0)"
    path = heartbeat_path(os.environ["SMSPARTNER_DATABASE_URL"])
    with pytest.raises(HeartbeatDirError, match=re.escape(expected)):
        write_heartbeat(path, datetime.now(UTC))

    # `run` refuses to start, naming the directory; `check` answers unhealthy (exit 1).
    assert main(["run", "--once"]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: heartbeat directory {runtime} ") and expected in error
    assert main(["check"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("unhealthy: heartbeat directory") and expected in err


def test_check_refuses_a_heartbeat_from_the_future(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = heartbeat_path(os.environ["SMSPARTNER_DATABASE_URL"])
    now = datetime.now(UTC)
    write_heartbeat(path, now - timedelta(seconds=2))
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith("healthy: last heartbeat 2.")

    for beat in (now + timedelta(minutes=10), datetime(9999, 12, 31, tzinfo=UTC)):
        write_heartbeat(path, beat)
        assert main(["check"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("unhealthy: the heartbeat is dated ")
        assert "in the future: not written by a running daemon" in err
    path.write_text("2026-11-26T09:00:00")  # no offset: not something the daemon writes
    assert main(["check"]) == 1
    assert "no heartbeat" in capsys.readouterr().err


# --- finding 8: clear errors instead of tracebacks --------------------------------------------


def test_an_age_that_would_overflow_the_calendar_is_one_line_naming_the_option(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--events-older-than", "3650000d"])
    assert exit_.value.code == 2
    error = one_error_line(capsys.readouterr().err)
    assert "argument --events-older-than: '3650000d' is more than 36500 days" in error
    assert main(["prune", "--events-older-than", "36500d", "--dry-run"]) == 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+asyncpg://u:pw@db/x", "driver 'asyncpg' is not supported: an async driver"),
        ("postgresql+pg8000://u:pw@db/x", "driver 'pg8000' is not supported"),
        ("sqlite+pysqlcipher://:pw@/x.db", "driver 'pysqlcipher' is not supported"),
    ],
)
def test_a_database_driver_that_cannot_work_is_refused_before_use(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    expected: str,
) -> None:
    monkeypatch.setenv("SMSPARTNER_DATABASE_URL", url)
    assert main(["tags"]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith("error: SMSPARTNER_DATABASE_URL: ") and expected in error
    assert "pw" not in error  # the URL is not quoted: it may hold a password


def test_a_tag_file_without_line_ends_is_refused_at_its_first_line(
    env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["track", "--from-file", "/dev/zero"]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert error == (
        "error: /dev/zero:1: line longer than 1024 characters; expected one tag (or "
        "tag,sent_at) per line"
    )
    tags = tmp_path / "tags.txt"
    tags.write_text("spring\n" + "x" * 1024 + "\n" + "y" * 5000 + "\nsummer\n")
    assert main(["track", "--from-file", str(tags)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {tags}:2: invalid tag")
    tags.write_text("spring\n# comment\n" + "y" * 5000 + "\nsummer\n")
    assert main(["track", "--from-file", str(tags)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {tags}:3: line longer")
    assert main(["tags", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # one bad line: nothing tracked


# --- finding 10: safe terminal output --------------------------------------------------------

HOSTILE_NUMBER = "+3361\x1b[2J\x1b]0;pwned\x07\u202e4321\x7f\x9b"
HOSTILE_TAG = "promo\u202egpj.exe"


@pytest.fixture
def hostile_rows(env: Path) -> Iterator[None]:
    """A tag whose numbers and error came from somewhere hostile, stored as they were
    (rows written before numbers were checked, or by another program)."""
    engine = create_engine(os.environ["SMSPARTNER_DATABASE_URL"])
    migrate.upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for tag in ("promo", HOSTILE_TAG):  # the second as another program may insert it
            tracking.track(
                conn, tag, sent_at=now, window_ends_at=now + timedelta(hours=48), now=now
            )
        conn.execute(
            sa.text("UPDATE tracked_tags SET last_error = :e"),
            {"e": "provider said \x1b[31mFAIL\x1b[0m\r\nforged: line"},
        )
        conn.execute(
            sa.text(
                "INSERT INTO delivery_statuses (tag, phone_number, status, stop_sms, "
                "first_seen_at, updated_at) VALUES ('promo', :p, 'delivered', 1, :n, :n)"
            ),
            {"p": HOSTILE_NUMBER, "n": "2026-11-26T09:00:00.000000Z"},
        )
        conn.execute(
            sa.text(
                "INSERT INTO stop_sms_optouts (phone_number, tag, first_seen_at) "
                "VALUES (:p, :t, :n)"
            ),
            {"t": HOSTILE_TAG, "p": HOSTILE_NUMBER, "n": "2026-11-26T09:00:00.000000Z"},
        )
    engine.dispose()
    yield


UNSAFE = ("\x1b", "\x07", "\x7f", "\x9b", "\u202e", "\r")


@pytest.mark.parametrize("argv", [["report", "promo", "--numbers"], ["optouts"], ["tags"]], ids=str)
def test_tables_escape_control_and_bidi_characters(
    hostile_rows: None, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not [c for c in UNSAFE if c in out], repr(out)
    if argv[0] != "report":
        assert "promo\\u202egpj.exe" in out
    if argv[0] != "tags":
        assert "+3361\\x1b[2J\\x1b]0;pwned\\x07\\u202e4321\\x7f\\x9b" in out
    else:
        assert "provider said \\x1b[31mFAIL\\x1b[0m\\x0d\\x0aforged: line" in out


@pytest.mark.parametrize(
    "argv", [["report", "promo", "--numbers", "--json"], ["optouts", "--json"]], ids=str
)
def test_json_output_escapes_them_and_gives_back_the_stored_text(
    hostile_rows: None, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.isascii() and not [c for c in UNSAFE if c in out], repr(out)
    data = json.loads(out)
    if isinstance(data, dict):  # report: the summary, then the numbers
        assert data["summary"]["tag"] == "promo"
        numbers = data["numbers"]
    else:
        numbers = data
        assert [n["tag"] for n in numbers] == [HOSTILE_TAG]
    assert [n["phone_number"] for n in numbers] == [HOSTILE_NUMBER]


def test_an_error_line_never_carries_a_terminal_escape(
    env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tags = tmp_path / "tags.csv"
    tags.write_text("tag,sent_at\nspring,\x1b[2Jsoon\n")
    assert main(["track", "--from-file", str(tags)]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert "\x1b" not in error and f"{tags}:2: sent_at" in error


# --- finding 11: a send time from the future, in-memory SQLite, a second path ----------------


def test_a_sent_at_more_than_a_day_ahead_is_refused_everywhere(
    env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["track", "typo", "--sent-at", "9998-12-31"]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith("error: --sent-at: 9998-12-31T00:00:00Z is more than a day ahead")

    tomorrow = (datetime.now(UTC) + timedelta(hours=23)).isoformat()
    assert main(["track", "early-clock", "--sent-at", tomorrow]) == 0  # clocks differ a bit
    capsys.readouterr()

    tags = tmp_path / "tags.csv"
    tags.write_text(f"tag,sent_at\nfine,\nlater,{tomorrow}\ntypo,9998-12-31\n")
    assert main(["track", "--from-file", str(tags)]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: {tags}:4: sent_at 9998-12-31T00:00:00Z is more than a day")

    # The shared rule POST /tags goes through too (its route answers InputError with 400).
    engine = create_engine(os.environ["SMSPARTNER_DATABASE_URL"])
    now = datetime.now(UTC)
    far = datetime(9998, 12, 31, tzinfo=UTC)
    refused = r"^sent_at: 9998-12-31T00:00:00Z is more than a day"
    with pytest.raises(InputError, match=refused), engine.begin() as conn:
        tracking.track(conn, "http", sent_at=far, window_ends_at=far, now=now)
    engine.dispose()
    assert main(["tags", "--json"]) == 0
    assert [t["tag"] for t in json.loads(capsys.readouterr().out)] == ["early-clock"]


def test_post_tags_answers_400_to_a_sent_at_more_than_a_day_ahead(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'http.db'}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    server = HttpServer(
        host="127.0.0.1",
        port=0,
        engine=engine,
        health=Health(lambda: now),
        metrics=Metrics(),
        settings=load_settings({}, database_url=url, http_port=0),
        clock=lambda: now,
        wake=lambda: None,
    )
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as http:
            refused = http.post("/tags", json={"tag": "typo", "sent_at": "9998-12-31"})
            assert refused.status_code == 400
            assert "is more than a day ahead of now" in refused.json()["error"]
            fine = http.post("/tags", json={"tag": "ok", "sent_at": "2026-11-27T08:00:00Z"})
            assert fine.status_code == 201
    finally:
        server.stop()
    with engine.connect() as conn:
        assert [r["tag"] for r in queries.list_tags(conn)] == ["ok"]
    engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?cache=shared&uri=true",
        "sqlite:///file:status?mode=memory&uri=true",
    ],
)
@pytest.mark.parametrize("argv", [["run", "--once"], ["run"]], ids=" ".join)
def test_run_refuses_an_in_memory_database(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    argv: list[str],
) -> None:
    monkeypatch.setenv("SMSPARTNER_DATABASE_URL", url)
    assert main(argv) == 2
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(
        "error: SMSPARTNER_DATABASE_URL: an in-memory SQLite database cannot be used by `run`"
    )


def test_a_second_path_to_a_held_database_file_is_refused(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Another `run` holds the file (the lock is per open file, so holding it here
    stands for that process); a hard link, a symlink or the same path is refused."""
    database = env
    held = sqlite_run_lock(f"sqlite:///{database}")
    try:
        hard, soft = tmp_path / "hard.db", tmp_path / "soft.db"
        os.link(database, hard)
        soft.symlink_to(database)
        for other in (database, hard, soft):
            with pytest.raises(DatabaseBusyError, match="already using"):
                sqlite_run_lock(f"sqlite:///{other}")
        monkeypatch.setenv("SMSPARTNER_DATABASE_URL", f"sqlite:///{hard}")
        assert main(["run", "--once"]) == 1
        error = one_error_line(capsys.readouterr().err)
        assert error.startswith(f"error: another smspartner-status run is already using {hard}")
    finally:
        release_run_lock(held)
    again = sqlite_run_lock(f"sqlite:///{hard}")  # free again once released
    release_run_lock(again)


_WRITE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (2)")
    conn.execute("COMMIT")
except sqlite3.OperationalError as exc:
    print(exc)
else:
    print("wrote")
"""


def test_sqlites_own_locks_still_work_while_the_run_lock_is_held(tmp_path: Path) -> None:
    """SQLite locks with POSIX locks, per process: our flock on the same file must not
    disturb them, so another process still waits for our write transaction."""
    database = tmp_path / "x.db"
    held = sqlite_run_lock(f"sqlite:///{database}")
    try:
        conn = sqlite3.connect(database, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (1)")

        def other_process_writes() -> str:
            return subprocess.run(
                [sys.executable, "-c", _WRITE, str(database)],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()

        assert other_process_writes() == "database is locked"
        conn.execute("COMMIT")
        assert other_process_writes() == "wrote"
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
        conn.close()
    finally:
        release_run_lock(held)
