"""The CLI as a user runs it: verbs through ``main(argv)``, the simulator over loopback, a
SQLite file. Checks exit codes, what is printed, and that no secret and no traceback ever
shows. Runs as a service user (capabilities dropped) share one process of their own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from daemon.simulator import Simulator
from tests.helpers import (
    API_KEY,
    assert_clean,
    permissions_apply,
    run_cli,
    run_clis_as_service_user,
)


def test_track_tags_report_untrack_round_trip(cli_env: dict[str, str]) -> None:
    res = run_cli("track", "spring-sale", "--sent-at", "2026-11-26T09:00:00+01:00", env=cli_env)
    assert res.code == 0, res.err
    assert "2026-11-26T08:00:00Z" in res.out and "2026-11-28T08:00:00Z" in res.out

    res = run_cli("tags", "--json", env=cli_env)
    tags = json.loads(res.out)
    assert [(t["tag"], t["state"], t["sent_at"]) for t in tags] == [
        ("spring-sale", "active", "2026-11-26T08:00:00Z")
    ]

    res = run_cli("report", "spring-sale", "--json", env=cli_env)
    summary = json.loads(res.out)["summary"]
    assert (summary["total"], summary["delivery_rate"]) == (0, None)

    assert run_cli("untrack", "spring-sale", env=cli_env).code == 0
    res = run_cli("tags", env=cli_env)
    assert "spring-sale" in res.out and "untracked" in res.out
    assert_clean(res.out, res.err)


def test_poll_prints_a_summary_and_report_lists_numbers(
    cli_env: dict[str, str], simulator: Simulator
) -> None:
    simulator.add_tag("promo", 40, sent_at=simulator.now() - timedelta(hours=2))
    res = run_cli("poll", "promo", env=cli_env)
    assert res.code == 0, res.err
    assert "40 numbers seen" in res.out and "statuses:" in res.out
    res = run_cli("report", "promo", "--numbers", "--json", env=cli_env)
    data = json.loads(res.out)
    assert data["summary"]["total"] == 40 and len(data["numbers"]) == 40
    res = run_cli("report", "promo", "--numbers", env=cli_env)
    assert res.code == 0 and res.out.count("+33") == 40
    assert_clean(res.out, res.err)


def test_poll_of_an_untracked_tag_polls_once_and_keeps_it_untracked(
    cli_env: dict[str, str], simulator: Simulator
) -> None:
    simulator.add_tag("paused", 10, sent_at=simulator.now() - timedelta(hours=2))
    assert run_cli("track", "paused", env=cli_env).code == 0
    assert run_cli("untrack", "paused", env=cli_env).code == 0
    res = run_cli("poll", "paused", env=cli_env)
    assert res.code == 0, res.err
    assert "10 numbers seen" in res.out
    assert "tag state: untracked" in res.out and "track paused` resumes polling" in res.out
    tags = json.loads(run_cli("tags", "--json", env=cli_env).out)
    assert [(t["tag"], t["state"], t["next_poll_at"]) for t in tags] == [
        ("paused", "untracked", None)
    ]
    assert_clean(res.out, res.err)


def test_demo_with_an_unusable_database_path_is_one_line(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir.db").mkdir()
    cases = [
        (tmp_path / "a-file" / "demo.db", "cannot create directory"),
        (tmp_path / "a-dir.db", "cannot replace"),
    ]
    for path, reason in cases:
        res = run_cli("demo", "--database", str(path), env=cli_env, timeout=60)
        assert res.code == 2, res.err
        assert res.err.startswith("error: --database: ") and reason in res.err
        assert len(res.err.strip().splitlines()) == 1
        assert_clean(res.out, res.err)


def test_poll_of_an_unknown_tag_is_not_a_failure(cli_env: dict[str, str]) -> None:
    res = run_cli("poll", "nothing-yet", env=cli_env)
    assert res.code == 0, res.err
    assert "no messages under this tag yet" in res.out


@pytest.mark.parametrize("key", ["wrong-key-4242", API_KEY + "x"])
def test_wrong_key_fails_clearly_writes_nothing_and_leaks_nothing(
    cli_env: dict[str, str], simulator: Simulator, key: str
) -> None:
    simulator.add_tag("promo", 10)
    env = {**cli_env, "SMSPARTNER_API_KEY": key, "SMSPARTNER_LOG_LEVEL": "debug"}
    res = run_cli("poll", "promo", env=env)
    assert res.code == 1
    assert "API key" in res.err and res.err.count("error:") == 1
    assert key not in res.out + res.err
    assert_clean(res.out, res.err)
    report = run_cli("report", "promo", "--json", env=cli_env)
    assert json.loads(report.out)["summary"]["total"] == 0


def test_debug_logs_of_a_successful_poll_never_show_the_key(
    cli_env: dict[str, str], simulator: Simulator
) -> None:
    simulator.add_tag("promo", 10)
    simulator.inject("500", tag="promo", times=1)
    res = run_cli("poll", "promo", env={**cli_env, "SMSPARTNER_LOG_LEVEL": "debug"})
    assert res.code == 0, res.err
    assert "api.retry_scheduled" in res.err and "poll.completed" in res.err
    assert "bulk-status-by-tag" in res.err  # httpx's own request log is there, redacted
    assert_clean(res.out, res.err)


def test_retries_exhausted_exit_non_zero(cli_env: dict[str, str], simulator: Simulator) -> None:
    simulator.add_tag("promo", 10)
    simulator.inject("503", tag="promo", times=None)
    res = run_cli("poll", "promo", env={**cli_env, "SMSPARTNER_MAX_RETRIES": "1"})
    assert res.code == 1 and "failed" in res.err
    assert_clean(res.out, res.err)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("track", "has space"), "whitespace"),
        (("track", "x" * 65), "at most 64"),
        (("track", "ok", "--sent-at", "yesterday"), "--sent-at"),
        (("track", "far", "--sent-at", "9999-12-31T23:00:00Z"), "--sent-at: '9999-12-31T23"),
        (("track", "far", "--sent-at", "9999-12-31T23:00:00Z"), "too far in the future"),
        (("track", "early", "--sent-at", "0001-01-01T00:00:00+01:00"), "--sent-at: '0001"),
        (("prune", "--events-older-than", "99999999999d"), "--events-older-than"),
        (("untrack", "never-tracked"), "not tracked"),
        (("report", "never-tracked"), "not tracked"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(
    cli_env: dict[str, str], args: tuple[str, ...], words: str
) -> None:
    res = run_cli(*args, env=cli_env)
    assert res.code == 2
    assert words in res.err and len(res.err.strip().splitlines()) == 1
    assert_clean(res.out, res.err)


def test_bad_setting_names_the_variable(cli_env: dict[str, str]) -> None:
    res = run_cli("tags", env={**cli_env, "SMSPARTNER_CONCURRENCY": "lots"})
    assert res.code == 2 and res.err.startswith("error: SMSPARTNER_CONCURRENCY:")
    res = run_cli("poll", "x", env={k: v for k, v in cli_env.items() if k != "SMSPARTNER_API_KEY"})
    assert res.code == 2 and "SMSPARTNER_API_KEY" in res.err


@pytest.mark.parametrize("hours", ["1e9", "8761", "inf"])
def test_a_report_window_beyond_a_year_is_refused(cli_env: dict[str, str], hours: str) -> None:
    for args in (("track", "t"), ("poll", "t"), ("run", "--once")):
        res = run_cli(*args, env={**cli_env, "SMSPARTNER_REPORT_WINDOW_HOURS": hours})
        assert res.code == 2, (args, res.err)
        assert res.err.startswith("error: SMSPARTNER_REPORT_WINDOW_HOURS:")
        assert len(res.err.strip().splitlines()) == 1
        assert_clean(res.out, res.err)
    res = run_cli("track", "t", env={**cli_env, "SMSPARTNER_REPORT_WINDOW_HOURS": "8760"})
    assert res.code == 0, res.err


def test_poll_without_a_key_fails_before_tracking_anything(cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "SMSPARTNER_API_KEY"}
    res = run_cli("poll", "new-tag", env=env)
    assert res.code == 2 and res.err.startswith("error: SMSPARTNER_API_KEY: not set")
    assert "tracking" not in res.out
    assert json.loads(run_cli("tags", "--json", env=cli_env).out) == []


def test_suspicious_tag_is_accepted_with_a_warning(cli_env: dict[str, str]) -> None:
    res = run_cli("track", "Spring-Sale-2026-November", env=cli_env)
    assert res.code == 0
    assert res.err.count("warning:") == 2


def test_db_upgrade_and_auto_migrate_off(cli_env: dict[str, str], tmp_path: object) -> None:
    env = {**cli_env, "SMSPARTNER_DATABASE_URL": cli_env["SMSPARTNER_DATABASE_URL"] + "2"}
    res = run_cli("tags", env={**env, "SMSPARTNER_AUTO_MIGRATE": "false"})
    assert res.code == 1 and "db upgrade" in res.err
    first = run_cli("db", "upgrade", env=env)
    second = run_cli("db", "upgrade", env=env)
    assert "upgraded from empty" in first.out and "already at" in second.out
    assert run_cli("tags", env={**env, "SMSPARTNER_AUTO_MIGRATE": "false"}).code == 0


def test_optouts_lists_stop_numbers(cli_env: dict[str, str], simulator: Simulator) -> None:
    simulator.set_number("promo", "+33699", "Delivered", date="1764144000", stop_sms=True)
    assert run_cli("poll", "promo", env=cli_env).code == 0
    res = run_cli("optouts", "--json", env=cli_env)
    assert [(o["phone_number"], o["tag"]) for o in json.loads(res.out)] == [("+33699", "promo")]
    assert "+33699" in run_cli("optouts", env=cli_env).out


def test_help_teaches(cli_env: dict[str, str]) -> None:
    res = run_cli("--help", env=cli_env)
    assert res.code == 0 and "examples:" in res.out and "SMSPARTNER_API_KEY" in res.out
    res = run_cli("track", "--help", env=cli_env)
    assert "--sent-at" in res.out and "report window" in res.out


def test_database_password_never_shows_when_the_database_is_down(
    cli_env: dict[str, str],
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        url = f"postgresql://app:Pa55-w0rd-xyz@127.0.0.1:{port}/sms"
        env = {**cli_env, "SMSPARTNER_DATABASE_URL": url, "SMSPARTNER_LOG_LEVEL": "debug"}
        for args in (("tags",), ("db", "upgrade"), ("poll", "x"), ("run", "--once")):
            res = run_cli(*args, env=env)
            assert res.code == 1, (args, res.err)
            assert "cannot" in res.err and "***" in res.err
            assert "Pa55-w0rd-xyz" not in res.out + res.err
            assert_clean(res.out, res.err)
            # psycopg's message spans two lines ("…refused\n\tIs the server running…").
            errors = [line for line in res.err.splitlines() if "error:" in line]
            assert len(errors) == 1 and errors[0].startswith("error: cannot"), res.err
            assert "Is the server running" in errors[0] and "\t" not in errors[0]
        res = run_cli("tags", env={**env, "SMSPARTNER_LOG_LEVEL": "info"})
        assert res.err.count("\n") == 1 and res.err.startswith("error: cannot open database")


# --- the SQLite file's path -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [("tags",), ("db", "upgrade"), ("track", "t"), ("run", "--once"), ("poll", "t")]
)
def test_a_database_directory_that_cannot_be_created_is_one_line_and_exit_2(
    cli_env: dict[str, str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    in_the_way = tmp_path / "state"
    in_the_way.write_text("a file where the directory should be")
    for database, reason in (
        (in_the_way / "x.db", "File exists"),
        (in_the_way / "sub" / "x.db", "Not a directory"),
    ):
        env = {**cli_env, "SMSPARTNER_DATABASE_URL": f"sqlite:///{database}"}
        res = run_cli(*args, env=env)
        assert res.code == 2, (args, res.err)
        assert res.err.startswith("error: SMSPARTNER_DATABASE_URL: cannot create directory ")
        assert str(database.parent) in res.err and reason in res.err
        assert res.err.count("\n") == 1
        assert_clean(res.out, res.err)
    assert in_the_way.read_text() == "a file where the directory should be"


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory the CLI, run as a service user would be, cannot write in."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        if not permissions_apply(directory / "probe"):
            pytest.skip("file permissions cannot be made to apply to this user")
        yield directory
    finally:
        directory.chmod(0o755)


def test_a_database_directory_that_cannot_be_written_is_one_line_and_exit_2(
    cli_env: dict[str, str], read_only_dir: Path
) -> None:
    verbs = [("tags",), ("db", "upgrade"), ("run", "--once"), ("run",)]
    databases = (read_only_dir / "x.db", read_only_dir / "sub" / "x.db")
    runs = [(args, database) for args in verbs for database in databases]
    results = run_clis_as_service_user(
        [(args, {**cli_env, "SMSPARTNER_DATABASE_URL": f"sqlite:///{db}"}) for args, db in runs]
    )
    for (args, database), res in zip(runs, results, strict=True):
        assert res.code == 2, (args, res.err)
        assert res.err.startswith("error: SMSPARTNER_DATABASE_URL: cannot ")
        if database.parent == read_only_dir:
            assert "cannot create x.db in directory" in res.err
        else:
            assert f"cannot create directory {database.parent}" in res.err
        assert str(read_only_dir) in res.err and "Permission denied" in res.err
        assert res.err.count("\n") == 1
        assert_clean(res.out, res.err)
    assert list(read_only_dir.iterdir()) == []


def test_a_read_only_database_file_is_read_but_not_written(
    cli_env: dict[str, str], simulator: Simulator, tmp_path: Path
) -> None:
    simulator.add_tag("promo", 5)
    assert run_cli("track", "kept", env=cli_env).code == 0
    database = Path(cli_env["SMSPARTNER_DATABASE_URL"].removeprefix("sqlite:///"))
    database.chmod(0o444)
    if not permissions_apply(database):
        database.chmod(0o644)
        pytest.skip("file permissions cannot be made to apply to this user")
    try:
        writes = [("track", "new"), ("poll", "promo"), ("run", "--once")]
        res, *results = run_clis_as_service_user(
            [(args, cli_env) for args in [("tags", "--json"), *writes]]
        )
        assert res.code == 0, res.err
        assert [t["tag"] for t in json.loads(res.out)] == ["kept"]
        for args, res in zip(writes, results, strict=True):
            assert res.code == 1, (args, res.err)
            errors = [line for line in res.err.splitlines() if line.startswith("error:")]
            assert errors == [
                f"error: database sqlite:///{database}: attempt to write a readonly database"
            ], res.err
            assert_clean(res.out, res.err)
    finally:
        database.chmod(0o644)
    assert [t["tag"] for t in json.loads(run_cli("tags", "--json", env=cli_env).out)] == ["kept"]


def test_a_file_that_is_not_a_database_is_one_line_and_exit_1(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    database = tmp_path / "notes.db"
    database.write_text("these are my notes, not a database\n")
    env = {**cli_env, "SMSPARTNER_DATABASE_URL": f"sqlite:///{database}"}
    for args in (("tags",), ("track", "t"), ("db", "upgrade"), ("run", "--once")):
        res = run_cli(*args, env=env)
        assert res.code == 1, (args, res.err)
        assert res.err.startswith("error: cannot ") and "file is not a database" in res.err
        assert res.err.count("\n") == 1
        assert_clean(res.out, res.err)
    assert database.read_text() == "these are my notes, not a database\n"
