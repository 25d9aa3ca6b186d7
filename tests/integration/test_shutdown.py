"""Stopping the daemon mid-poll: SIGTERM lets a poll that can finish in time commit, and
abandons one that cannot without writing anything, exiting 0 within 10 s either way, for
`run` and `run --once` alike; `run --once` keeps the leases of long polls alive so a `run`
replica cannot take them."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from daemon import migrate, tracking
from daemon.app import App
from daemon.db import create_engine
from daemon.scheduler import Daemon
from daemon.settings import load_settings
from daemon.simulator import Simulator
from tests.helpers import API_KEY, Running, run_cli, wait_for

#: The tag's columns a poll writes; an abandoned poll must leave them all as they were.
POLL_COLUMNS = (
    "state",
    "next_poll_at",
    "last_polled_at",
    "last_success_at",
    "poll_count",
    "consecutive_failures",
    "last_error",
)


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    """`run` at 4 requests a second, without its HTTP server."""
    return {**cli_env, "SMSPARTNER_HTTP_PORT": "0", "SMSPARTNER_RATE_LIMIT_PER_SECOND": "4"}


def query(env: dict[str, str], sql: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(env["SMSPARTNER_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def tag_row(env: dict[str, str], tag: str) -> tuple[Any, ...]:
    columns = ", ".join(POLL_COLUMNS)
    [row] = query(env, f"SELECT {columns} FROM tracked_tags WHERE tag = :t", t=tag)
    return row


def track_with_an_earlier_failure(env: dict[str, str], tag: str) -> tuple[Any, ...]:
    """Track ``tag``, due now, as if its last poll had failed: an abandoned poll must
    neither count a new failure nor replace the error."""
    assert run_cli("track", tag, env=env).code == 0
    query(
        env,
        "UPDATE tracked_tags SET consecutive_failures = 2, last_error = 'an earlier failure'"
        " WHERE tag = :t",
        t=tag,
    )
    return tag_row(env, tag)


def sigterm(daemon: Running) -> Callable[[], float]:
    """Send SIGTERM; return a function telling the seconds since."""
    sent = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    return lambda: time.monotonic() - sent


def exit_after(daemon: Running, since_signal: Callable[[], float]) -> tuple[int, float]:
    """Wait for the exit (without signalling again); the exit code and seconds taken."""
    code = daemon.proc.wait(timeout=30)
    return code, since_signal()


def events(daemon: Running, name: str) -> list[dict[str, object]]:
    return [e for e in daemon.events() if e["event"] == name]


def assert_abandoned_and_untouched(
    env: dict[str, str], daemon: Running, tag: str, before: tuple[Any, ...]
) -> dict[str, object]:
    """One `poll.abandoned` warning; nothing of the poll in the database; no lease left."""
    [abandoned] = events(daemon, "poll.abandoned")
    assert (abandoned["tag"], abandoned["level"]) == (tag, "warning")
    assert not events(daemon, "poll.failed") and not events(daemon, "poll.completed")
    assert query(env, "SELECT outcome FROM poll_runs WHERE tag = :t", t=tag) == []
    assert query(env, "SELECT count(*) FROM delivery_statuses WHERE tag = :t", t=tag) == [(0,)]
    assert tag_row(env, tag) == before  # still due, same failures and error
    assert query(env, "SELECT lease_owner FROM tracked_tags") == [(None,)]
    assert events(daemon, "daemon.stopped")
    return abandoned


def test_sigterm_during_a_poll_that_can_finish_in_time_lets_it_commit(
    env: dict[str, str], simulator: Simulator, running: Callable[..., Running]
) -> None:
    simulator.add_tag("big", 1000, page_size=50)  # 20 pages: about 5 s at 4 a second
    assert run_cli("track", "big", env=env).code == 0
    daemon = running(env)
    wait_for(lambda: simulator.request_count("big") >= 3, 30, "the poll to be under way")
    since_signal = sigterm(daemon)
    code, took = exit_after(daemon, since_signal)
    assert code == 0 and took < 10
    # The rest of the pages came after the signal, rate limit and all, and were stored.
    # (a 21st, empty, page proves the 20th was the last: ``total`` is only a hint)
    assert simulator.request_count("big") == 21
    assert query(env, "SELECT count(*) FROM delivery_statuses WHERE tag = 'big'") == [(1000,)]
    assert query(env, "SELECT outcome, pages, error FROM poll_runs") == [("ok", 21, None)]
    assert query(env, "SELECT consecutive_failures, last_error, lease_owner FROM tracked_tags") == [
        (0, None, None)
    ]
    names = [e["event"] for e in daemon.events()]
    assert names.index("daemon.signal") < names.index("poll.completed")
    assert "poll.abandoned" not in names and "api.retry_scheduled" not in names


def test_sigterm_during_a_poll_too_long_to_finish_abandons_it_and_the_next_start_polls_it(
    env: dict[str, str], simulator: Simulator, running: Callable[..., Running]
) -> None:
    simulator.add_tag("huge", 4000, page_size=50)  # 80 pages: 20 s at 4 a second
    before = track_with_an_earlier_failure(env, "huge")
    daemon = running(env)
    wait_for(lambda: simulator.request_count("huge") >= 3, 30, "the poll to be under way")
    since_signal = sigterm(daemon)
    code, took = exit_after(daemon, since_signal)
    assert code == 0 and took < 10
    fetched = simulator.request_count("huge")
    assert fetched < 80  # the page loop stopped at the deadline
    abandoned = assert_abandoned_and_untouched(env, daemon, "huge", before)
    assert abandoned["pages"] == fetched
    assert not events(daemon, "api.retry_scheduled")

    # The tag stayed due: the next start polls it in full.
    again = run_cli("run", "--once", env={**env, "SMSPARTNER_RATE_LIMIT_PER_SECOND": "0"})
    assert again.code == 0 and "polled 1 tag(s): 1 ok, 0 failed" in again.out
    assert query(env, "SELECT count(*) FROM delivery_statuses WHERE tag = 'huge'") == [(4000,)]
    assert query(env, "SELECT outcome FROM poll_runs") == [("ok",)]


def test_a_retry_asked_for_after_sigterm_that_would_end_too_late_is_not_scheduled(
    env: dict[str, str], simulator: Simulator, running: Callable[..., Running]
) -> None:
    simulator.add_tag("busy", 1000, page_size=50)
    before = track_with_an_earlier_failure(env, "busy")
    daemon = running(env)
    wait_for(lambda: simulator.request_count("busy") >= 3, 30, "the poll to be under way")
    since_signal = sigterm(daemon)
    wait_for(lambda: "daemon.stopping" in daemon.log.read_text(), 5, "the shutdown to begin")
    simulator.inject("429", tag="busy", retry_after=30)  # the next page: come back in 30 s
    code, took = exit_after(daemon, since_signal)
    assert code == 0 and took < 10
    abandoned = assert_abandoned_and_untouched(env, daemon, "busy", before)
    assert "retry in 30.0 s" in str(abandoned["reason"])
    assert events(daemon, "api.rate_limited") and not events(daemon, "api.retry_scheduled")


def test_sigterm_during_a_long_retry_wait_abandons_the_poll_at_once(
    env: dict[str, str], simulator: Simulator, running: Callable[..., Running]
) -> None:
    simulator.add_tag("later", 5)
    before = track_with_an_earlier_failure(env, "later")
    simulator.inject("429", tag="later", retry_after=60)
    daemon = running(env)
    wait_for(lambda: "api.retry_scheduled" in daemon.log.read_text(), 30, "the retry wait")
    since_signal = sigterm(daemon)
    code, took = exit_after(daemon, since_signal)
    assert code == 0 and took < 10
    abandoned = assert_abandoned_and_untouched(env, daemon, "later", before)
    assert abandoned["pages"] == 0
    assert simulator.request_count("later") == 1  # not retried on the way out


@pytest.mark.parametrize(
    ("fault", "params", "when"),
    [
        ("trickle", {"interval": 1.0}, "first request"),
        ("trickle", {"interval": 1.0}, "mid-fetch"),
        ("slow", {"seconds": 60.0}, "mid-fetch"),
    ],
    ids=["trickle-new-connection", "trickle-kept-alive", "silent-kept-alive"],
)
def test_sigterm_while_the_provider_trickles_or_stalls_exits_within_10_s(
    env: dict[str, str],
    simulator: Simulator,
    running: Callable[..., Running],
    fault: str,
    params: dict[str, float],
    when: str,
) -> None:
    """The request in flight at SIGTERM would take minutes (a byte a second, or nothing
    at all, with a 60 s request deadline): it is cut at the shutdown deadline and the
    poll abandoned, on a fresh connection or a kept-alive one alike."""
    simulator.add_tag("stuck", 1000, page_size=50)  # 20 pages: about 5 s at 4 a second
    before = track_with_an_earlier_failure(env, "stuck")
    if when == "first request":
        simulator.inject(fault, tag="stuck", times=None, **params)
    daemon = running({**env, "SMSPARTNER_HTTP_TIMEOUT_SECONDS": "60"})
    if when == "mid-fetch":
        wait_for(lambda: simulator.request_count("stuck") >= 2, 30, "the poll to be under way")
        simulator.inject(fault, tag="stuck", times=None, **params)
        sent = simulator.request_count("stuck")
        wait_for(lambda: simulator.request_count("stuck") > sent, 5, "a faulty request")
    else:
        wait_for(lambda: simulator.request_count("stuck") >= 1, 30, "the first request")
    since_signal = sigterm(daemon)
    code, took = exit_after(daemon, since_signal)
    assert code == 0 and took < 10, (code, took)
    abandoned = assert_abandoned_and_untouched(env, daemon, "stuck", before)
    assert "cut short" in str(abandoned["reason"])
    assert "Traceback" not in daemon.log.read_text()


# --- run --once and the leases ----------------------------------------------------------


@pytest.fixture
def once_daemon(tmp_path: Any, simulator: Simulator) -> Iterator[Callable[..., Daemon]]:
    """A daemon for `run --once` on a SQLite file, with an injected lease length."""
    apps: list[App] = []

    def build(url: str, *, lease: timedelta, rate: float) -> Daemon:
        settings = load_settings(
            {},
            api_key=API_KEY,
            base_url=simulator.url,
            database_url=url,
            http_timeout_seconds=5,
            rate_limit_per_second=rate,
            concurrency=2,
        )
        apps.append(App(settings, lease=lease))
        return apps[-1].daemon

    yield build
    for app in apps:
        app.close()


def test_sigterm_stops_run_once_as_it_stops_run(
    env: dict[str, str], simulator: Simulator, running: Callable[..., Running]
) -> None:
    """A cron job's pass stopped by systemd: the poll in flight commits, no other tag is
    claimed, the leases go, exit 0 within 10 s; the next pass polls what was left."""
    simulator.add_tag("big", 1000, page_size=50)  # 20 pages: about 5 s at 4 a second
    simulator.add_tag("next", 5)
    for tag in ("big", "next"):  # "big" is due first
        assert run_cli("track", tag, env=env).code == 0
    once = running({**env, "SMSPARTNER_CONCURRENCY": "1"}, "--once")
    wait_for(lambda: simulator.request_count("big") >= 3, 30, "the poll to be under way")
    code, took = exit_after(once, sigterm(once))
    assert code == 0 and took < 10
    assert query(env, "SELECT count(*) FROM delivery_statuses WHERE tag = 'big'") == [(1000,)]
    assert query(env, "SELECT tag, outcome FROM poll_runs") == [("big", "ok")]
    assert simulator.request_count("next") == 0
    assert query(env, "SELECT lease_owner FROM tracked_tags") == [(None,), (None,)]
    output = once.log.read_text()
    assert "polled 1 tag(s): 1 ok, 0 failed (stopped by a signal" in output
    assert "Traceback" not in output
    names = [e["event"] for e in once.events()]
    assert names.index("daemon.signal") < names.index("poll.completed")

    again = run_cli("run", "--once", env=env)
    assert again.code == 0 and "polled 1 tag(s): 1 ok, 0 failed" in again.out
    assert query(env, "SELECT tag FROM poll_runs ORDER BY id") == [("big",), ("next",)]


def test_run_once_keeps_renewing_the_lease_of_a_long_poll(
    tmp_path: Any, once_daemon: Callable[..., Daemon], simulator: Simulator
) -> None:
    """A poll longer than the lease: a replica running `run` on the same database must
    never be able to claim the tag while it runs, so its lease keeps moving forward."""
    url = f"sqlite:///{tmp_path / 'once.db'}"
    replica = create_engine(url)  # the other replica's view of the database
    migrate.upgrade(replica)
    simulator.add_tag("long", 600, page_size=50)  # 12 pages: 5.5 s at 2 a second
    with replica.begin() as conn:
        now = datetime.now(UTC)
        tracking.track(conn, "long", sent_at=now, window_ends_at=now + timedelta(hours=48), now=now)
    daemon = once_daemon(url, lease=timedelta(seconds=3), rate=2)
    once = threading.Thread(target=daemon.run_once)
    once.start()
    wait_for(lambda: simulator.request_count("long") >= 1, 10, "the poll to start")
    leases, stolen = [], []
    while once.is_alive():
        now = datetime.now(UTC)
        with replica.begin() as conn:
            stolen += tracking.claim_due(
                conn, now=now, owner="replica-2", lease_until=now + timedelta(seconds=60), limit=5
            )
            row = tracking.get_tag(conn, "long")
        assert row is not None
        if row["lease_expires_at"] is not None:
            leases.append(row["lease_expires_at"])
        time.sleep(0.25)
    once.join()
    replica.dispose()
    assert stolen == []
    assert (daemon.stats.polls, daemon.stats.failures) == (1, 0)
    assert simulator.request_count("long") == 13  # and an empty 13th page ends the fetch
    # Renewed while the poll ran, not just taken once at the start.
    assert leases and max(leases) - min(leases) >= timedelta(seconds=2)
