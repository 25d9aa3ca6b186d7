"""The daemon as users run it: `run --once` through ``main(argv)``, `run` as a process
where the process is the subject (the HTTP surface, sd_notify, signals, the
single-writer lock), and the dispatcher stepped with the rig's clock for its schedule."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from daemon.health import Health, heartbeat_age, heartbeat_path, remove_heartbeat, write_heartbeat
from daemon.scheduler import Daemon
from daemon.simulator import Simulator
from tests.helpers import API_KEY, Running, daemon_for, free_port, run_cli, step, wait_for
from tests.integration.conftest import NOW, Rig


@pytest.fixture
def daemon_env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "SMSPARTNER_HTTP_PORT": str(free_port())}


def test_run_once_makes_one_last_poll_of_a_closed_window(
    cli_env: dict[str, str], simulator: Simulator, db_url: str
) -> None:
    env = {**cli_env, "SMSPARTNER_DATABASE_URL": db_url}
    sent = datetime.now(UTC) - timedelta(hours=50)
    simulator.set_number("old", "+33610000001", "Waiting", date=str(int(sent.timestamp())))
    simulator.set_number("old", "+33610000002", "Delivered", date=str(int(sent.timestamp())))
    assert run_cli("track", "old", "--sent-at", sent.isoformat(), env=env).code == 0
    res = run_cli("run", "--once", env=env)
    assert res.code == 0, res.out + res.err
    assert "polled 1 tag(s): 1 ok, 0 failed" in res.out
    tags = json.loads(run_cli("tags", "--json", env=env).out)
    assert tags[0]["state"] == "expired"
    summary = json.loads(run_cli("report", "old", "--json", env=env).out)["summary"]
    assert (summary["expired"], summary["delivered"], summary["waiting"]) == (1, 1, 0)
    assert simulator.request_count("old", page=1) == 1  # one poll (and its empty page 2)
    # Nothing is due any more: a second pass polls nothing.
    assert "polled 0 tag(s)" in run_cli("run", "--once", env=env).out


def test_run_once_exits_non_zero_when_a_poll_fails(
    cli_env: dict[str, str], simulator: Simulator
) -> None:
    simulator.add_tag("good", 5)
    simulator.add_tag("bad", 5)
    simulator.inject("503", tag="bad", times=None)
    for tag in ("good", "bad"):
        run_cli("track", tag, env=cli_env)
    res = run_cli("run", "--once", env={**cli_env, "SMSPARTNER_MAX_RETRIES": "1"})
    assert res.code == 1
    assert "1 ok, 1 failed" in res.out and "'bad' failed" in res.err
    assert API_KEY not in res.out + res.err


def test_run_serves_http_polls_new_tags_fast_and_stops_on_sigterm(
    daemon_env: dict[str, str], simulator: Simulator, running: Callable[..., Running]
) -> None:
    simulator.add_tag("live", 700)
    base = f"http://127.0.0.1:{daemon_env['SMSPARTNER_HTTP_PORT']}"
    daemon = running(daemon_env)
    with httpx.Client(base_url=base, timeout=5) as http:
        wait_for(lambda: _get(http, "/healthz") == 200, 20, "/healthz")
        posted = time.monotonic()
        answer = http.post("/tags", json={"tag": "live"})
        assert answer.status_code == 201, answer.text

        def polled() -> bool:
            tags = http.get("/tags").json()
            return any(t["tag"] == "live" and t.get("total") == 700 for t in tags)

        wait_for(polled, 5, "the new tag to be polled and stored")
        assert time.monotonic() - posted < 5

        for body in (
            b"{broken",
            b'{"tag": "has space"}',
            b'{"tag": "x", "sent_at": "soon"}',
            b"[]",
        ):
            bad = http.post("/tags", content=body, headers={"Content-Type": "application/json"})
            assert bad.status_code == 400 and "error" in bad.json()
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert 'smspartner_status_polls_total{outcome="ok"}' in metrics.text
        assert _get(http, "/readyz") == 200
        for path in ("/metrics", "/tags", "/readyz", "/healthz"):
            assert API_KEY not in http.get(path).text  # no answer ever carries the key
    code, took = daemon.stop()
    assert code == 0 and took < 10
    events = [e["event"] for e in daemon.events()]
    assert "daemon.started" in events and "poll.completed" in events
    assert "daemon.stopped" in events and "http.stopped" in events
    assert API_KEY not in daemon.log.read_text()


def _get(http: httpx.Client, path: str) -> int:
    try:
        return http.get(path).status_code
    except httpx.TransportError:
        return 0


def test_a_row_inserted_by_another_program_is_adopted_and_polled_at_the_next_dispatch(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    """A sidecar registers a tag with a bare row (no window, no schedule): the next
    dispatch (every 2 s in `run`; test_http_fds watches one in real time) fills its
    window and polls it."""
    r = rig()
    r.sim.add_tag("sidecar", 50)
    daemon = daemon_for(r)
    stopping.append(daemon)
    step(daemon)  # nothing tracked yet
    with r.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tracked_tags (tag) VALUES ('sidecar')"))
    with capture_logs() as logs:
        step(daemon)
    assert len(r.rows("sidecar")) == 50
    assert [e["tag"] for e in logs if e["event"] == "tag.adopted"] == ["sidecar"]


def test_an_absurd_inserted_row_does_not_stop_the_other_tags(
    cli_env: dict[str, str], simulator: Simulator
) -> None:
    simulator.add_tag("fine", 20)
    assert run_cli("track", "fine", env=cli_env).code == 0
    db = cli_env["SMSPARTNER_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:  # another program, with a typo'd year
        conn.execute(
            "INSERT INTO tracked_tags (tag, sent_at) VALUES ('typo', '9999-12-31T23:00:00.000Z')"
        )
    res = run_cli("run", "--once", env=cli_env, timeout=60)
    assert res.code == 0, res.err
    assert "Traceback" not in res.out + res.err
    with sqlite3.connect(db) as conn:
        fine = conn.execute("SELECT count(*) FROM delivery_statuses WHERE tag = 'fine'")
        assert fine.fetchone()[0] == 20
        ends = conn.execute("SELECT window_ends_at FROM tracked_tags WHERE tag = 'typo'")
        assert ends.fetchone()[0].startswith("9999-")  # clamped inside the calendar


def test_second_run_on_the_same_sqlite_file_refuses(
    cli_env: dict[str, str], running: Callable[..., Running]
) -> None:
    env = {**cli_env, "SMSPARTNER_HTTP_PORT": "0"}
    first = running(env)
    wait_for(lambda: "daemon.started" in first.log.read_text(), 20, "start")
    second = run_cli("run", env=env, timeout=30)
    assert second.code == 1
    assert "already using" in second.err and len(second.err.strip().splitlines()) == 1
    assert first.stop()[0] == 0


def test_sd_notify_ready_watchdog_stopping_and_check(
    cli_env: dict[str, str], tmp_path: Path, running: Callable[..., Running]
) -> None:
    sock_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(20)
    env = {**cli_env, "SMSPARTNER_HTTP_PORT": "0", "NOTIFY_SOCKET": sock_path}
    assert run_cli("check", env=env).code == 1  # nothing running yet
    try:
        daemon = running(env)
        messages = []
        while "READY=1" not in messages or "WATCHDOG=1" not in messages:
            messages.append(listener.recv(256).decode())
        check = run_cli("check", env=env)
        assert check.code == 0 and "healthy" in check.out
        daemon.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages.append(listener.recv(256).decode())
        assert daemon.stop()[0] == 0
        assert messages.index("READY=1") < messages.index("STOPPING=1")
    finally:
        listener.close()
    # A clean stop removes the heartbeat: `check` fails at once, not a minute later.
    check = run_cli("check", env=env)
    assert check.code == 1 and "no heartbeat" in check.err


def test_check_is_unhealthy_as_soon_as_run_stops_cleanly(
    cli_env: dict[str, str], running: Callable[..., Running]
) -> None:
    env = {**cli_env, "SMSPARTNER_HTTP_PORT": "0"}
    daemon = running(env)
    wait_for(lambda: run_cli("check", env=env).code == 0, 20, "the first heartbeat")
    assert daemon.stop(signal.SIGTERM)[0] == 0
    check = run_cli("check", env=env)
    assert (check.code, check.err) == (1, "unhealthy: no heartbeat from a running daemon\n")
    # After a crash the heartbeat stays until it is stale: nothing cleaned up.
    crashed = running(env)
    wait_for(lambda: run_cli("check", env=env).code == 0, 20, "the first heartbeat")
    crashed.stop(signal.SIGKILL)
    assert heartbeat_path(env["SMSPARTNER_DATABASE_URL"]).exists()
    heartbeat_path(env["SMSPARTNER_DATABASE_URL"]).unlink()


def test_a_clean_stop_keeps_the_heartbeat_another_daemon_wrote(tmp_path: Path) -> None:
    path, ours = tmp_path / "beat", datetime(2026, 11, 26, 9, 0, 2, tzinfo=UTC)
    write_heartbeat(path, ours)
    remove_heartbeat(path, ours)
    assert not path.exists()
    remove_heartbeat(path, ours)  # already gone: nothing to do, no error
    write_heartbeat(path, ours + timedelta(seconds=1))  # a replica on the same database
    remove_heartbeat(path, ours)
    assert heartbeat_age(path, ours + timedelta(seconds=2)) == timedelta(seconds=1)


def test_wrong_key_pauses_polling_with_one_error_and_fails_readiness(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    """The provider rejects the key: one error, readiness fails, and no tag is polled
    until 5 minutes have passed; then one probe poll, which fails again."""
    r = rig(api_key="wrong-key-777")
    for tag in ("a", "b", "c"):
        r.sim.add_tag(tag, 5)
        r.track(tag)
    health = Health(r.clock)
    daemon = daemon_for(r, health, concurrency=1)
    stopping.append(daemon)
    with capture_logs() as logs:
        step(daemon)
        assert r.sim.request_count() == 1
        problems = health.problems()
        assert any("API key" in p for p in problems), problems
        for seconds in (2, 4, 120, 299):  # more dispatches: still paused, nothing sent
            r.clock.now = NOW + timedelta(seconds=seconds)
            step(daemon)
        assert r.sim.request_count() == 1
        r.clock.now = NOW + timedelta(minutes=5, seconds=1)
        step(daemon)
        assert r.sim.request_count() == 2  # one probe, not every tag
    events = [e["event"] for e in logs]
    assert events.count("daemon.auth_paused") == 1
    assert "wrong-key-777" not in repr(logs)
    assert any("API key" in p for p in health.problems())


def test_sigint_also_stops_cleanly(
    cli_env: dict[str, str], running: Callable[..., Running]
) -> None:
    daemon = running({**cli_env, "SMSPARTNER_HTTP_PORT": "0"})
    wait_for(lambda: "daemon.started" in daemon.log.read_text(), 20, "start")
    code, took = daemon.stop(signal.SIGINT)
    assert code == 0 and took < 10


def test_leases_are_released_on_clean_stop(
    cli_env: dict[str, str], simulator: Simulator, running: Callable[..., Running]
) -> None:
    simulator.add_tag("t", 5)
    run_cli("track", "t", env=cli_env)
    daemon = running({**cli_env, "SMSPARTNER_HTTP_PORT": "0"})
    wait_for(lambda: "poll.completed" in daemon.log.read_text(), 20, "a poll")
    assert daemon.stop()[0] == 0
    url = cli_env["SMSPARTNER_DATABASE_URL"]
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        owners = conn.execute(sa.text("SELECT lease_owner FROM tracked_tags")).all()
    eng.dispose()
    assert owners == [(None,)]


@pytest.mark.usefixtures("debug_logs")
def test_the_daemon_re_polls_a_large_tag_from_what_it_remembers(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    """A tag of 1,500 numbers (reports keep arriving meanwhile), polled by the daemon
    every minute: only the first poll merges every number, later ones leave out what
    they stored, and the counts they keep from memory still equal a recount."""
    r = rig()
    start = r.sim.now()  # the provider's dates are real times: so is the rig's clock here
    r.sim.add_tag("big", 1_500, sent_at=start - timedelta(minutes=1))
    r.clock.now = start
    r.track("big")
    daemon = daemon_for(r)
    stopping.append(daemon)
    with capture_logs() as logs:
        for minute in range(3):
            r.clock.now = start + timedelta(minutes=minute)
            step(daemon)
    fetches = [e for e in logs if e["event"] == "api.pagination_stopped"]
    assert len(fetches) == 3
    first, *later = fetches
    assert first["repeated"] == 0
    assert all(0 < int(e["repeated"]) <= 1_500 for e in later), later
    with r.engine.connect() as conn:
        summary = conn.execute(
            sa.text(
                "SELECT total, waiting, delivered, not_delivered, failed, stop_sms "
                "FROM tag_summary WHERE tag = 'big'"
            )
        ).one()
        recount = conn.execute(
            sa.text(
                "SELECT count(*), "
                "sum(CASE WHEN status = 'waiting' THEN 1 ELSE 0 END), "
                "sum(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END), "
                "sum(CASE WHEN status = 'not_delivered' THEN 1 ELSE 0 END), "
                "sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), "
                "sum(CASE WHEN stop_sms THEN 1 ELSE 0 END) "
                "FROM delivery_statuses WHERE tag = 'big'"
            )
        ).one()
    assert tuple(summary) == tuple(recount) and summary[0] == 1_500
