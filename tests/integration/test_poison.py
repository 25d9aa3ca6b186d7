"""A hostile provider's items and a poll that crashes: on SQLite and PostgreSQL, through
the real client over loopback, the `poll` verb in-process and the daemon stepped with an
injected clock. One bad item never costs the good ones; a poll that crashes is recorded
and backed off, never re-polled at once; readiness sees polls that do not succeed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from daemon import tracking
from daemon.cli import main
from daemon.db import poll_runs
from daemon.health import FAILING_TOLERANCE, Health
from daemon.scheduler import Daemon
from tests.helpers import API_KEY, daemon_for, refuse_rows, step, unix
from tests.integration.conftest import NOW, Rig

GOOD = [
    {"phoneNumber": "+33600000001", "status": "Delivered", "stopSMS": False, "date": unix(NOW)},
    {"phoneNumber": "+33600000002", "status": "Waiting", "stopSMS": False, "date": unix(NOW)},
]
#: One of each item that once crashed a poll, or must never be stored.
POISON: list[dict[str, Any]] = [
    {"phoneNumber": "+33600000003", "status": "\ud800", "stopSMS": False, "date": unix(NOW)},
    {"phoneNumber": "+3360000\x00004", "status": "Delivered", "stopSMS": False},
    {"phoneNumber": "+33600000005", "status": "Deliv\x00ered", "stopSMS": False},
    {"phoneNumber": "x" * 300, "status": "Delivered", "stopSMS": False},
    {"phoneNumber": "9" * 5_000_000, "status": "Delivered", "stopSMS": False},  # 5 MB
    {"phoneNumber": "\u001b[2J+336", "status": "Delivered", "stopSMS": False},
    {"phoneNumber": "+336\u202e0006", "status": "Delivered", "stopSMS": False},
    {"phoneNumber": "+33600000007\ud800", "status": "Delivered", "stopSMS": False},
]
#: Kept, but without a date: one from the year 5138, one from 1990.
ODD_DATES = [
    {"phoneNumber": "+33600000008", "status": "Not delivered", "date": "99999999999"},
    {"phoneNumber": "+33600000009", "status": "Delivered", "date": "631152000"},
]


def runs(r: Rig, tag: str) -> list[tuple[str, str | None]]:
    with r.engine.connect() as conn:
        query = sa.select(poll_runs.c.outcome, poll_runs.c.error).where(poll_runs.c.tag == tag)
        return [(o, e) for o, e in conn.execute(query.order_by(poll_runs.c.id))]


def tag_row(r: Rig, tag: str) -> dict[str, Any]:
    with r.engine.connect() as conn:
        row = tracking.get_tag(conn, tag)
    assert row is not None
    return dict(row)


# --- poisoned items ---------------------------------------------------------------------


def test_poisoned_items_are_skipped_and_the_good_ones_stored(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("poison")
    r.sim.set_items("poison", [*POISON[:4], GOOD[0], *POISON[4:], GOOD[1], *ODD_DATES])
    with capture_logs() as logs:
        result = r.poller.poll("poison")
    assert (result.outcome, result.skipped) == ("ok", len(POISON))
    rows = r.rows("poison")
    assert sorted(rows) == [f"+3360000000{n}" for n in (1, 2, 8, 9)]
    assert rows["+33600000001"]["reported_at"] == NOW
    assert rows["+33600000008"]["reported_at"] is None  # not the year 5138
    assert rows["+33600000009"]["reported_at"] is None  # not 1990
    skipped = [e for e in logs if e["event"] == "api.item_skipped"]
    assert {e["field"] for e in skipped} == {"phoneNumber", "status"}
    assert len(skipped) == len(POISON)
    assert all(len(str(e)) < 1000 for e in skipped)  # no 5 MB echo
    coerced = [e for e in logs if e["event"] == "api.item_coerced" and e["field"] == "date"]
    assert coerced and coerced[0]["items"] == 2
    assert runs(r, "poison") == [("ok", None)]


def test_a_far_future_date_does_not_block_the_reports_that_follow(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.track("future")
    r.sim.set_items("future", [ODD_DATES[0]])  # Not delivered, year 5138
    assert r.poller.poll("future").ok
    later = NOW + timedelta(minutes=5)
    r.sim.set_number("future", "+33600000008", "Delivered", date=unix(later))
    r.clock.now += timedelta(minutes=6)
    assert r.poller.poll("future").changed == 1
    row = r.rows("future")["+33600000008"]
    assert (row["status"], row["reported_at"]) == ("delivered", later)


def test_an_item_a_day_ahead_is_kept_and_one_further_is_not(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("skew")
    r.sim.set_items(
        "skew",
        [
            {"phoneNumber": "+331", "status": "Delivered", "date": unix(NOW + timedelta(hours=23))},
            {"phoneNumber": "+332", "status": "Delivered", "date": unix(NOW + timedelta(hours=25))},
        ],
    )
    assert r.poller.poll("skew").ok
    rows = r.rows("skew")
    assert rows["+331"]["reported_at"] == NOW + timedelta(hours=23)
    assert rows["+332"]["reported_at"] is None


# --- the `poll` verb in-process ----------------------------------------------------------


class RawProvider:
    """A provider answering every request with the same raw bytes: for bodies the
    simulator cannot produce (its JSON encoder refuses to nest a thousand levels)."""

    def __init__(self, body: bytes) -> None:
        self.requests = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> RawProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch, db_url: str) -> Iterator[Callable[..., int]]:
    """``main(argv)`` with the test's settings; the logging it configures is undone."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("SMSPARTNER_API_KEY", API_KEY)
    monkeypatch.setenv("SMSPARTNER_DATABASE_URL", db_url)
    monkeypatch.setenv("SMSPARTNER_RETRY_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("SMSPARTNER_RATE_LIMIT_PER_SECOND", "0")
    monkeypatch.setenv("SMSPARTNER_LOG_FORMAT", "json")

    def run(*argv: str, base_url: str) -> int:
        monkeypatch.setenv("SMSPARTNER_BASE_URL", base_url)
        return main(list(argv))

    yield run
    structlog.configure(**saved)
    root.handlers[:], root.level = handlers, level


def _database(db_url: str) -> sa.Engine:
    return sa.create_engine(db_url, poolclass=sa.pool.NullPool)


def test_poll_verb_stores_the_good_items_of_a_poisoned_answer(
    in_process: Callable[..., int],
    rig: Callable[..., Rig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = rig()  # migrates the database; its simulator serves the verb
    r.sim.set_items("poison", [*POISON, *GOOD, *ODD_DATES])
    code = in_process("poll", "poison", base_url=r.sim.url)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err and API_KEY not in out + err
    assert "4 numbers seen" in out
    assert sorted(r.rows("poison")) == [f"+3360000000{n}" for n in (1, 2, 8, 9)]
    assert runs(r, "poison") == [("ok", None)]


#: Nested far deeper than any JSON parser here recurses: orjson stops at 1,024 levels,
#: the standard parser at Python's recursion limit.
DEEP = b'{"success": true, "code": 200, "StatutResponse_List": %s%s}' % (
    b"[" * 100_000,
    b"]" * 100_000,
)


def test_an_answer_nested_too_deep_is_one_failed_poll_with_backoff(
    in_process: Callable[..., int],
    rig: Callable[..., Rig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = rig()
    with RawProvider(DEEP) as provider:
        code = in_process("poll", "deep", base_url=provider.url)
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err and "RecursionError" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreadable" in errors[0]
    assert provider.requests >= 1
    [(outcome, error)] = runs(r, "deep")
    assert outcome == "transient_error" and error and "unreadable" in error
    row = tag_row(r, "deep")
    assert row["consecutive_failures"] == 1
    # Backed off 30 s from when the answer was in: after the poll began, before it ended.
    backoff = row["next_poll_at"] - timedelta(seconds=30)
    with r.engine.connect() as conn:
        query = sa.select(poll_runs.c.started_at, poll_runs.c.finished_at)
        [(started, finished)] = conn.execute(query).all()
    assert row["last_polled_at"] == started <= backoff <= finished


def test_an_error_message_nested_a_thousand_levels_is_one_clear_error(
    in_process: Callable[..., int],
    rig: Callable[..., Rig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Deep enough for Python's recursion (json.dumps), shallow enough for orjson's 1,024.
    nested = b"[" * 1020 + b"]" * 1020
    body = b'{"success": false, "code": 99, "message": ' + nested + b"}"
    r = rig()
    with RawProvider(body) as provider:
        code = in_process("poll", "refused", base_url=provider.url)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "code 99" in err and provider.requests == 1
    assert [o for o, _ in runs(r, "refused")] == ["api_error"]


# --- a poll that crashes ---------------------------------------------------------------


def poison(r: Rig, table: str, tag: str) -> None:
    """Make the database refuse ``table``'s rows of one tag (see :func:`refuse_rows`)."""
    refuse_rows(r.engine, table, "tag", tag)


def test_a_crashing_poll_is_recorded_as_a_failure_and_backed_off(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("crash")
    r.sim.add_tag("crash", 5)
    poison(r, "delivery_statuses", "crash")
    with capture_logs() as logs:
        result = r.poller.poll("crash")
    assert (result.ok, result.outcome) == (False, "transient_error")
    [(outcome, error)] = runs(r, "crash")
    assert outcome == "transient_error" and error and "poisoned row" in error
    assert "[SQL:" not in error and len(error) <= 300
    row = tag_row(r, "crash")
    assert (row["consecutive_failures"], row["poll_count"]) == (1, 1)
    assert row["next_poll_at"] == NOW + timedelta(seconds=30)
    assert row["last_error"] == error and row["lease_owner"] is None
    assert r.rows("crash") == {}
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["poll.crashed"]


def test_a_poll_still_crashing_after_the_grace_hour_expires_the_tag_like_any_failure(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.track("crash", sent_at=NOW - timedelta(hours=47))  # the window ends at NOW + 1 h
    r.sim.set_number("crash", "+331", "Waiting", date=unix(NOW - timedelta(hours=47)))
    assert r.poller.poll("crash").state == "active"
    poison(r, "delivery_statuses", "crash")
    r.sim.set_number("crash", "+332", "Waiting", date=unix(NOW))  # a new row: refused
    r.clock.now = NOW + timedelta(minutes=90)  # within the grace hour: retried
    within = r.poller.poll("crash")
    assert (within.outcome, within.state, within.expired) == ("transient_error", "active", 0)
    assert tag_row(r, "crash")["next_poll_at"] == r.clock.now + timedelta(seconds=30)
    r.clock.now = NOW + timedelta(hours=2)  # the grace hour is over
    result = r.poller.poll("crash")
    assert (result.outcome, result.state, result.expired) == ("transient_error", "expired", 1)
    assert [o for o, _ in runs(r, "crash")] == ["ok", "transient_error", "transient_error"]
    row = tag_row(r, "crash")
    assert (row["state"], row["next_poll_at"], row["consecutive_failures"]) == ("expired", None, 2)
    assert {p: n["status"] for p, n in r.rows("crash").items()} == {"+331": "expired"}


# --- the daemon, stepped with the rig's clock ------------------------------------------


def crashing_rig(rig: Callable[..., Rig], *, unrecordable: bool) -> Rig:
    """Tags good1, crash, good2, all due; the database refuses the rows of ``crash``
    (and, when ``unrecordable``, even its ``poll_runs`` row)."""
    r = rig()
    for tag in ("good1", "crash", "good2"):
        r.track(tag)
        r.sim.add_tag(tag, 5)
    poison(r, "delivery_statuses", "crash")
    if unrecordable:
        poison(r, "poll_runs", "crash")
    return r


def requests(r: Rig) -> list[int]:
    """Polls of each tag so far: its page-1 requests (a poll also asks for the empty page
    that ends a tag)."""
    return [r.sim.request_count(t, page=1) for t in ("good1", "crash", "good2")]


def test_a_crashing_tag_backs_off_and_the_healthy_ones_keep_their_cadence(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    r = crashing_rig(rig, unrecordable=False)
    daemon = daemon_for(r)
    stopping.append(daemon)
    with capture_logs() as logs:
        for seconds, expected in [
            (0, [1, 1, 1]),
            (10, [1, 1, 1]),  # backing off
            (31, [1, 2, 1]),  # retried after 30 s …
            (61, [2, 2, 2]),  # … while the healthy tags keep their minute
            (80, [2, 2, 2]),  # … and the next wait is twice as long
            (92, [2, 3, 2]),
        ]:
            r.clock.now = NOW + timedelta(seconds=seconds)
            step(daemon)
            assert requests(r) == expected, seconds
    assert len(r.rows("good1")) == len(r.rows("good2")) == 5
    assert [o for o, _ in runs(r, "crash")] == ["transient_error"] * 3
    assert tag_row(r, "crash")["consecutive_failures"] == 3
    errors = {e["event"] for e in logs if e["log_level"] == "error"}
    assert errors == {"poll.crashed"}


def test_a_tag_whose_failure_cannot_even_be_recorded_cools_down_in_memory(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    r = crashing_rig(rig, unrecordable=True)
    daemon = daemon_for(r)
    stopping.append(daemon)
    with capture_logs() as logs:
        for seconds, expected in [
            (0, [1, 1, 1]),
            (2, [1, 1, 1]),  # cooling down, though still due in the database
            (6, [1, 2, 1]),  # after 5 s …
            (12, [1, 2, 1]),
            (17, [1, 3, 1]),  # … then 10 s
            (61, [2, 4, 2]),  # the healthy tags keep their minute
        ]:
            r.clock.now = NOW + timedelta(seconds=seconds)
            step(daemon)
            assert requests(r) == expected, seconds
    assert runs(r, "crash") == []
    assert len(r.rows("good1")) == len(r.rows("good2")) == 5
    errors = {e["event"] for e in logs if e["log_level"] == "error"}
    assert errors == {"poll.crashed", "poll.database_error"}


def test_run_once_polls_a_crashing_tag_once(rig: Callable[..., Rig]) -> None:
    r = rig()
    for tag in ("crash", "good"):
        r.track(tag)
        r.sim.add_tag(tag, 5)
    poison(r, "delivery_statuses", "crash")
    poison(r, "poll_runs", "crash")
    done = threading.Event()
    stats: list[Any] = []
    once = threading.Thread(
        target=lambda: (stats.append(daemon_for(r).run_once()), done.set()), daemon=True
    )
    once.start()
    assert done.wait(15), "run --once kept re-polling the crashing tag"
    once.join()
    assert (stats[0].polls, stats[0].failures) == (2, 1)
    assert r.sim.request_count("crash", page=1) == 1 and len(r.rows("good")) == 5


def test_readiness_fails_while_polls_run_and_none_succeeds(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    r = rig()
    health = Health(r.clock)
    daemon = daemon_for(r, health)
    stopping.append(daemon)
    r.track("hang")
    r.sim.add_tag("hang", 5)
    r.sim.inject("slow", tag="hang", seconds=1.0)
    daemon.dispatch()
    deadline = time.monotonic() + 10
    while r.sim.request_count("hang") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The provider holds the poll; the clock runs past the tolerance meanwhile.
    r.clock.now = NOW + FAILING_TOLERANCE + timedelta(minutes=1)
    health.beat()
    problems = health.problems()
    assert any("no poll has succeeded" in p and "1 poll(s) running" in p for p in problems)
    step(daemon)  # the poll ends well: ready again
    assert health.problems() == []


def test_readiness_fails_when_every_poll_crashes_and_recovers_with_one_success(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    r = rig()
    health = Health(r.clock)
    daemon = daemon_for(r, health)
    stopping.append(daemon)
    r.track("crash")
    r.sim.add_tag("crash", 5)
    poison(r, "delivery_statuses", "crash")
    poison(r, "poll_runs", "crash")  # unrecorded: only the scheduler knows
    step(daemon)
    assert health.problems() == []  # one failure is not a verdict
    for minute in range(1, 17):
        r.clock.now = NOW + timedelta(minutes=minute)
        step(daemon)
    assert any("no poll has succeeded for 16 min" in p for p in health.problems())
    r.track("good")
    r.sim.add_tag("good", 5)
    step(daemon)
    assert health.problems() == []


def test_an_idle_daemon_stays_ready(rig: Callable[..., Rig], stopping: list[Daemon]) -> None:
    r = rig()
    health = Health(r.clock)
    daemon = daemon_for(r, health)
    stopping.append(daemon)
    step(daemon)
    r.clock.now = NOW + timedelta(hours=2)
    step(daemon)
    assert health.problems() == []
