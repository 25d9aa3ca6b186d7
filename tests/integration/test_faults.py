"""The fault matrix: every way the provider can misbehave, over real loopback HTTP.

Each fault fails (or degrades) one poll cleanly: stored data stays, the run is
recorded, the tag backs off, and the key never shows — not even in debug logs. A daemon
with one faulty tag keeps its other tags on cadence.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from daemon import tracking
from daemon.app import App
from daemon.db import create_engine, delivery_statuses, poll_runs, tracked_tags
from daemon.errors import PollAbandoned, TransientApiError
from daemon.scheduler import Daemon
from daemon.settings import load_settings
from daemon.simulator import Simulator
from daemon.smspartner import SmsPartnerClient
from daemon.status import next_poll_at
from tests.helpers import API_KEY, daemon_for, run_cli, step
from tests.integration.conftest import NOW, Rig
from tests.unit.test_redaction import SPELLINGS, assert_hidden

FAULTS: dict[str, Callable[[Simulator], None]] = {
    "5xx burst": lambda s: s.inject("503", tag="bad", times=None),
    "429 storm": lambda s: s.inject("429", tag="bad", times=None, retry_after=0.05),
    "429 in JSON": lambda s: s.inject("429json", tag="bad", times=None),
    "HTML page": lambda s: s.inject("html", tag="bad", times=None),
    "truncated JSON": lambda s: s.inject("truncated", tag="bad", times=None),
    "reset mid-body": lambda s: s.inject("reset", tag="bad", times=None),
    "timeout": lambda s: s.inject("slow", tag="bad", times=None, seconds=1.5),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_fails_the_poll_cleanly_and_the_tag_backs_off(
    rig: Callable[..., Rig], fault: str
) -> None:
    r = rig(max_retries=1, http_timeout_seconds=0.5)
    r.track("bad", sent_at=NOW - timedelta(hours=3))  # cadence 15 min: backoff is visible
    r.sim.add_tag("bad", 30, sent_at=NOW - timedelta(hours=3))
    assert r.poller.poll("bad").ok
    before = r.rows("bad")
    FAULTS[fault](r.sim)
    waits = []
    with capture_logs() as logs:
        for _ in range(3):
            result = r.poller.poll("bad")
            assert (result.ok, result.outcome) == (False, "transient_error"), result
            with r.engine.connect() as conn:
                row = tracking.get_tag(conn, "bad")
            assert row is not None
            waits.append(row["next_poll_at"] - r.clock.now)
            r.clock.now = row["next_poll_at"]
    assert waits == [timedelta(seconds=30), timedelta(seconds=60), timedelta(seconds=120)]
    assert r.rows("bad") == before  # nothing stored was touched
    assert API_KEY not in repr(logs) and "k3y-Secret" not in repr(logs)
    with r.engine.connect() as conn:
        errors = [e for (e,) in conn.execute(sa.select(poll_runs.c.error))]
    assert all(API_KEY not in (e or "") for e in errors)


def test_wrong_types_in_every_field_skip_items_not_pages(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("weird")
    r.sim.set_items("weird", [
        {"phoneNumber": 33612345678, "status": "Delivered", "stopSMS": "1", "date": 1764140000},
        {"phoneNumber": ["+331"], "status": "Delivered"},
        {"phoneNumber": "+332", "status": 200},
        {"phoneNumber": "+333", "status": "Delivered", "stopSMS": {"x": 1}, "date": [1]},
        {"phoneNumber": "+334", "status": "Waiting", "stopSMS": None, "date": None},
        "not an object",
        None,
    ])  # fmt: skip
    result = r.poller.poll("weird")
    assert result.ok and result.skipped == 4
    rows = r.rows("weird")
    assert set(rows) == {"33612345678", "+333", "+334"}
    assert rows["33612345678"]["stop_sms"] is True
    assert rows["+333"]["reported_at"] is None


def test_endless_pages_stop_at_the_cap(rig: Callable[..., Rig]) -> None:
    r = rig(max_pages=5)
    r.track("endless")
    r.sim.add_tag("endless", 10)
    r.sim.inject("endless", tag="endless", times=None)
    with capture_logs() as logs:
        result = r.poller.poll("endless")
    assert result.ok and result.pages == 5
    assert r.sim.request_count("endless") == 5
    assert any(e["event"] == "api.pagination_stopped" and e["reason"] == "max_pages" for e in logs)


def test_connection_refused_is_a_transient_failure(db_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # bound, never listening
        settings = load_settings(
            {},
            api_key=API_KEY,
            base_url=dead,
            database_url=db_url,
            max_retries=1,
            retry_backoff_seconds=0.01,
            http_timeout_seconds=2,
            rate_limit_per_second=0,
        )
        with App(settings, clock=lambda: NOW) as app:
            with app.engine.begin() as conn:
                tracking.track(
                    conn, "t", sent_at=NOW, window_ends_at=NOW + timedelta(hours=48), now=NOW
                )
            result = app.poller.poll("t")
    assert result.outcome == "transient_error"
    assert "ConnectError" in (result.error or "") and API_KEY not in (result.error or "")


def test_healthy_tags_keep_their_cadence_while_one_tag_fails(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    """Every poll of one tag times out: it backs off, while the healthy tags are still
    polled on their minute. Three workers, the daemon stepped with the rig's clock."""
    r = rig(max_retries=1, http_timeout_seconds=0.1)
    tags = ("good1", "good2", "bad")
    for tag in tags:
        r.track(tag)
        r.sim.add_tag(tag, 20)
    r.sim.inject("slow", tag="bad", times=None, seconds=2)  # every attempt times out
    daemon = daemon_for(r, concurrency=3)
    stopping.append(daemon)
    seen = []
    for seconds in (0, 30, 60, 90, 120, 150, 180):
        r.clock.now = NOW + timedelta(seconds=seconds)
        step(daemon)
        seen.append([r.sim.request_count(t, page=1) for t in tags])
    # bad: 1 attempt a poll (a deadline cut is not retried within the poll); polled again
    # after 30 s, then 60 s (its cadence caps the backoff)
    assert seen == [
        [1, 1, 1],
        [1, 1, 2],
        [2, 2, 2],
        [2, 2, 3],
        [3, 3, 3],
        [3, 3, 4],
        [4, 4, 4],
    ]
    with r.engine.connect() as conn:
        runs = conn.execute(sa.select(poll_runs.c.tag, poll_runs.c.outcome)).all()
    assert sorted(o for t, o in runs if t != "bad") == ["ok"] * 8
    assert [o for t, o in runs if t == "bad"] == ["transient_error"] * 4


# --- hostile providers: trickling, echoing the key, lying about total ------------------


def stored_errors(env: dict[str, str]) -> list[str]:
    """Every error text the database keeps: poll_runs.error and tracked_tags.last_error."""
    engine = create_engine(env["SMSPARTNER_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            runs = conn.execute(sa.select(poll_runs.c.error)).scalars().all()
            tags = conn.execute(sa.select(tracked_tags.c.last_error)).scalars().all()
    finally:
        engine.dispose()
    return [text for text in (*runs, *tags) if text]


def test_poll_against_a_trickling_provider_ends_by_its_deadline(
    simulator: Simulator, cli_env: dict[str, str]
) -> None:
    """One byte every 0.2 s: each read succeeds, so only a whole-request deadline ends it
    (the answer alone would take over a minute). The cut request is not retried within
    the poll: a provider that trickles once trickles again, and each retry would hold a
    worker for another deadline; the tag's backoff polls it again later."""
    simulator.add_tag("slowly", 5)
    simulator.inject("trickle", tag="slowly", times=None, interval=0.2, bytes=1)
    started = time.monotonic()
    env = {**cli_env, "SMSPARTNER_HTTP_TIMEOUT_SECONDS": "1", "SMSPARTNER_MAX_RETRIES": "3"}
    result = run_cli("poll", "slowly", env=env)
    took = time.monotonic() - started
    assert result.code == 1 and took < 3, (took, result)
    assert "no complete answer within 1 s (the whole-request deadline)" in result.err
    assert "gave up after" not in result.err and "Traceback" not in result.err
    assert simulator.request_count("slowly") == 1
    engine = create_engine(cli_env["SMSPARTNER_DATABASE_URL"])
    with engine.connect() as conn:
        runs = conn.execute(sa.select(poll_runs.c.outcome, poll_runs.c.error)).all()
    engine.dispose()
    assert [outcome for outcome, _ in runs] == ["transient_error"]
    assert "whole-request deadline" in (runs[0][1] or "")


def test_a_failed_polls_backoff_counts_from_when_its_answer_came(
    db_url: str, simulator: Simulator
) -> None:
    """A poll the provider held for 45 s is backed off from its end, not its start:
    otherwise a provider slow enough finds the tag due again the moment the poll ends,
    and a few such tags hold every worker."""
    answered = NOW + timedelta(seconds=45)
    readings = iter([NOW])

    def clock() -> datetime:
        return next(readings, answered)  # the poll's start, then after its fetch

    settings = load_settings(
        {}, api_key=API_KEY, base_url=simulator.url, database_url=db_url, max_retries=0
    )
    app = App(settings, clock=clock)
    try:
        with app.engine.begin() as conn:
            tracking.track(
                conn, "held", sent_at=NOW, window_ends_at=NOW + timedelta(hours=48), now=NOW
            )
        simulator.inject("500", tag="held", times=None)
        assert not app.poller.poll("held").ok
        with app.engine.connect() as conn:
            row = tracking.get_tag(conn, "held")
            started = conn.execute(sa.select(poll_runs.c.started_at)).scalar_one()
    finally:
        app.close()
    assert row is not None and started == NOW
    expected = next_poll_at(
        sent_at=NOW,
        window_ends_at=NOW + timedelta(hours=48),
        now=answered,
        cadence=settings.cadence,
        consecutive_failures=1,
    )
    assert row["next_poll_at"] == expected > answered


@pytest.mark.parametrize("fault", ["echo_key", "echo_key_html"])
def test_a_key_echoed_escaped_appears_nowhere(
    simulator: Simulator,
    cli_env: dict[str, str],
    fault: str,
) -> None:
    """The provider echoes the key raw, JSON-escaped, HTML-escaped and lowercase
    percent-encoded: none of it reaches stdout, stderr, debug logs or the database (and
    so not ``GET /tags``, which shows ``last_error``)."""
    simulator.add_tag("echo", 3)
    simulator.inject(fault, tag="echo", times=None)
    env = {**cli_env, "SMSPARTNER_LOG_LEVEL": "debug", "SMSPARTNER_LOG_FORMAT": "json"}
    result = run_cli("poll", "echo", env=env)
    assert result.code == 1
    errors = stored_errors(cli_env)
    assert errors  # the failure was recorded, redacted
    assert '"event": "api.request"' in result.err  # debug lines were written
    for text in (result.out, result.err, *errors):
        assert_hidden(text)
    assert "***" in result.err


@pytest.mark.parametrize("spelling", ["raw", "json slash", "html"])
def test_a_key_echoed_in_an_items_status_is_never_stored_nor_printed(
    simulator: Simulator, cli_env: dict[str, str], spelling: str
) -> None:
    """An item whose status text echoes the key is still a report (status ``unknown``),
    but the text kept in ``provider_status``, and so printed by ``report --numbers`` and
    logged at debug level by the database driver, has the key masked."""
    items: list[dict[str, object]] = [
        {"phoneNumber": "+33600000001", "status": f"Unknown key {SPELLINGS[spelling]}"},
        {"phoneNumber": "+33600000002", "status": "Delivered"},
    ]
    for item in items:
        item.update(stopSMS=False, date="1780000000")
    simulator.set_items("echoing", items)
    env = {**cli_env, "SMSPARTNER_LOG_LEVEL": "debug", "SMSPARTNER_LOG_FORMAT": "json"}
    polled = run_cli("poll", "echoing", env=env)
    assert polled.code == 0, polled
    report = run_cli("report", "echoing", "--numbers", env=cli_env)
    assert report.code == 0 and "+33600000001" in report.out and "***" in report.out
    engine = create_engine(cli_env["SMSPARTNER_DATABASE_URL"])
    with engine.connect() as conn:
        stored = conn.execute(sa.select(delivery_statuses.c.provider_status)).scalars().all()
    engine.dispose()
    assert sorted(stored) == ["Delivered", "Unknown key ***"]
    for text in (polled.out, polled.err, report.out, report.err):
        assert_hidden(text)


@pytest.mark.parametrize(
    "lie", [{"total": 1}, {"total": 1, "current_page": 1}], ids=["total", "total+currentPage"]
)
def test_a_lying_total_or_current_page_never_truncates_a_tag(
    rig: Callable[..., Rig], lie: dict[str, float]
) -> None:
    r = rig()
    r.track("liar")
    r.sim.add_tag("liar", 3000, page_size=500)
    r.sim.inject("lying_total", tag="liar", times=None, **lie)
    with capture_logs() as logs:
        result = r.poller.poll("liar")
    assert result.ok and len(r.rows("liar")) == 3000
    assert r.sim.request_count("liar") == 7  # six full pages, then an empty one
    [warning] = [e for e in logs if e["event"] == "api.total_mismatch"]
    assert (warning["log_level"], warning["total"], warning["items"]) == ("warning", 1, 3000)


def _client(simulator: Simulator, http: httpx.Client, **options: Any) -> SmsPartnerClient:
    return SmsPartnerClient(
        http,
        api_key=API_KEY,
        base_url=simulator.url,
        max_retries=0,
        rate_limit_per_second=0,
        **options,
    )


def test_a_trickle_on_a_kept_alive_connection_is_cut_at_the_request_deadline(
    simulator: Simulator,
) -> None:
    """The second fetch reuses the pooled connection, whose socket httpx names only once
    headers arrive; the trickle starts with the status line, so they never do."""
    simulator.add_tag("t", 5)
    with httpx.Client(timeout=30) as http:
        client = _client(simulator, http, request_timeout=0.5)
        assert client.fetch_tag("t").items == 5
        simulator.inject("trickle", tag="t", times=None, interval=0.2)
        started = time.monotonic()
        with pytest.raises(TransientApiError, match=r"no complete answer within 0\.5 s"):
            client.fetch_tag("t")
        assert time.monotonic() - started < 1.5
        simulator.clear_faults()
        assert client.fetch_tag("t").items == 5  # the pool recovers


@pytest.mark.parametrize(
    ("fault", "params"),
    [("trickle", {"interval": 0.2}), ("slow", {"seconds": 30})],
    ids=["trickling", "silent"],
)
def test_a_request_under_way_at_the_shutdown_deadline_is_cut_short(
    simulator: Simulator, fault: str, params: dict[str, float]
) -> None:
    """SIGTERM arrives 0.3 s into a request allowed 30 s: the read already blocked is
    interrupted at the shutdown deadline, whether bytes trickle or none come."""
    simulator.add_tag("t", 5)
    simulator.inject(fault, tag="t", times=None, **params)
    shutdown: list[float] = []
    with httpx.Client(timeout=30) as http:
        client = _client(simulator, http, deadline=lambda: shutdown[0] if shutdown else None)
        timer = threading.Timer(0.3, lambda: shutdown.append(time.monotonic() + 0.5))
        timer.start()
        started = time.monotonic()
        with pytest.raises(PollAbandoned, match="cut short"):
            client.fetch_tag("t")
        took = time.monotonic() - started
        timer.join()
    assert 0.7 < took < 1.5


def test_a_password_in_the_base_url_is_never_logged(
    simulator: Simulator, cli_env: dict[str, str]
) -> None:
    """httpx logs every request URL at debug level; the userinfo goes before it does."""
    simulator.add_tag("t", 3)
    with_password = simulator.url.replace("http://", "http://bob:pa55-w0rd@")
    env = {**cli_env, "SMSPARTNER_BASE_URL": with_password, "SMSPARTNER_LOG_LEVEL": "debug"}
    result = run_cli("poll", "t", env=env)
    assert result.code == 0, result
    assert "HTTP Request: GET http://127.0.0.1:" in result.err  # httpx's own line, kept
    assert "pa55-w0rd" not in result.out + result.err and "bob:" not in result.err
