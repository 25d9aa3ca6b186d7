"""One poll of one tag, end to end: the real client over loopback HTTP to the simulator,
the real store on SQLite and PostgreSQL. Assertions are on stored rows and log events."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from daemon import queries, tracking
from daemon.db import (
    TAG_SUMMARY_SQL_0001,
    delivery_status_events,
    delivery_statuses,
    poll_runs,
    stop_sms_optouts,
)
from daemon.errors import StoreError
from tests.helpers import API_KEY, unix
from tests.integration.conftest import NOW, Rig


def test_waiting_becomes_delivered_and_final_never_regresses(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("spring")
    r.sim.set_number("spring", "+33611111111", "Waiting", date=unix(NOW))
    assert r.poller.poll("spring").ok
    assert r.rows("spring")["+33611111111"]["status"] == "waiting"

    r.sim.set_number("spring", "+33611111111", "Delivered", date=unix(NOW + timedelta(minutes=2)))
    r.clock.now += timedelta(minutes=3)
    delivered = r.poller.poll("spring")
    assert delivered.changed == 1
    assert delivered.final_delays == (120.0,)  # sent at NOW, reported 2 minutes later
    # The provider flip-flops back to Waiting, then sends an older final report.
    r.sim.set_number("spring", "+33611111111", "Waiting", date=unix(NOW))
    r.clock.now += timedelta(minutes=3)
    assert r.poller.poll("spring").changed == 0
    r.sim.set_number(
        "spring", "+33611111111", "Not delivered", date=unix(NOW + timedelta(minutes=1))
    )
    r.clock.now += timedelta(minutes=3)
    assert r.poller.poll("spring").changed == 0

    row = r.rows("spring")["+33611111111"]
    assert (row["status"], row["reported_at"]) == ("delivered", NOW + timedelta(minutes=2))
    with r.engine.connect() as conn:
        events = conn.execute(
            sa.select(
                delivery_status_events.c.old_status, delivery_status_events.c.new_status
            ).order_by(delivery_status_events.c.id)
        ).all()
    assert [tuple(e) for e in events] == [(None, "waiting"), ("waiting", "delivered")]
    assert r.count(poll_runs) == 4


def test_1234_numbers_over_3_pages_are_all_stored(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("big")
    phones = r.sim.add_tag("big", 1234, sent_at=NOW - timedelta(hours=1), page_size=500)
    result = r.poller.poll("big")
    assert (result.pages, result.numbers_seen) == (3, 1234)
    assert set(r.rows("big")) == set(phones)
    assert r.sim.request_count("big") == 3
    assert r.count(delivery_status_events) == 1234


def test_a_server_ignoring_page_does_not_make_the_client_loop(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("loop")
    r.sim.add_tag("loop", 1234, sent_at=NOW - timedelta(hours=1), page_size=500)
    r.sim.inject("ignore_page", tag="loop", times=None)
    result = r.poller.poll("loop")
    assert result.ok
    assert r.sim.request_count("loop") <= 3
    assert len(r.rows("loop")) == 500  # what it got is kept


def test_transient_faults_in_a_row_are_retried_and_the_poll_succeeds(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.track("flaky")
    r.sim.add_tag("flaky", 20, sent_at=NOW - timedelta(hours=1))
    r.sim.inject("500", tag="flaky")
    r.sim.inject("429", tag="flaky", retry_after=0.2)
    r.sim.inject("html", tag="flaky")
    r.sim.inject("truncated", tag="flaky")
    with capture_logs() as logs:
        result = r.poller.poll("flaky")
    assert result.ok and len(r.rows("flaky")) == 20
    # Four faults, page 1, then an empty page 2: a first fetch cannot know the page size.
    assert r.sim.request_count("flaky") == 6
    assert sum(e["event"] == "api.retry_scheduled" for e in logs) == 4


def test_exhausted_retries_fail_the_poll_and_leave_stored_data_untouched(
    rig: Callable[..., Rig],
) -> None:
    r = rig(max_retries=2)
    r.track("down")
    r.sim.add_tag("down", 30, sent_at=NOW - timedelta(hours=1))
    assert r.poller.poll("down").ok
    before = r.rows("down")
    r.sim.inject("500", tag="down", times=None)
    r.clock.now += timedelta(minutes=5)
    result = r.poller.poll("down")
    assert (result.ok, result.outcome) == (False, "transient_error")
    assert r.rows("down") == before
    with r.engine.connect() as conn:
        row = tracking.get_tag(conn, "down")
        outcomes = conn.execute(sa.select(poll_runs.c.outcome).order_by(poll_runs.c.id)).all()
    assert row is not None and row["consecutive_failures"] == 1
    assert row["next_poll_at"] == r.clock.now + timedelta(seconds=30)
    assert [o for (o,) in outcomes] == ["ok", "transient_error"]


def test_every_odd_provider_value_is_handled_as_designed(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("odd")
    when = unix(NOW - timedelta(minutes=5))
    r.sim.set_items(
        "odd",
        [
            {"phoneNumber": "+331", "status": "delivered", "stopSMS": False, "date": when},
            {"phoneNumber": "+332", "status": "KO", "stopSMS": False, "date": when},
            {"phoneNumber": "+333", "status": "Sent", "stopSMS": False, "date": when},
            {"phoneNumber": "+334", "status": "Delivered", "stopSMS": "1", "date": when},
            {"status": "Delivered", "stopSMS": False, "date": when},
            {"phoneNumber": "+335", "status": "Delivered", "stopSMS": False, "date": "garbage"},
        ],
    )
    with capture_logs() as logs:
        result = r.poller.poll("odd")
    rows = r.rows("odd")
    assert {p: row["status"] for p, row in rows.items()} == {
        "+331": "delivered",
        "+332": "failed",
        "+333": "unknown",
        "+334": "delivered",
        "+335": "delivered",
    }
    assert rows["+333"]["provider_status"] == "Sent"
    assert rows["+334"]["stop_sms"] is True and rows["+331"]["stop_sms"] is False
    assert rows["+335"]["reported_at"] is None
    assert result.skipped == 1
    assert [e["phone_number"] for e in logs if e["event"] == "stop_sms.opt_out"] == ["+334"]
    assert any(e["event"] == "api.item_skipped" for e in logs)
    assert r.count(stop_sms_optouts) == 1


def test_key_and_tag_needing_url_encoding_reach_the_server_intact(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    tag = "a+b&c=d/é%20?#"
    r.track(tag)
    r.sim.set_number(tag, "+331", "Delivered", date=unix(NOW))
    assert r.poller.poll(tag).numbers_seen == 1
    last = r.sim.requests[-1]
    assert (last.tag, last.api_key) == (tag, API_KEY)


def test_no_messages_yet_is_not_a_failure(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("early")
    result = r.poller.poll("early")
    assert (result.ok, result.no_messages, result.state) == (True, True, "active")
    assert r.count(delivery_statuses) == 0


def test_closed_window_expires_waiting_numbers_and_the_tag(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("old", sent_at=NOW - timedelta(hours=50))
    r.sim.set_number("old", "+331", "Waiting", date=unix(NOW - timedelta(hours=50)))
    r.sim.set_number("old", "+332", "Delivered", date=unix(NOW - timedelta(hours=49)))
    result = r.poller.poll("old")
    assert (result.state, result.expired) == ("expired", 1)
    assert {p: row["status"] for p, row in r.rows("old").items()} == {
        "+331": "expired",
        "+332": "delivered",
    }
    with r.engine.connect() as conn:
        row = tracking.get_tag(conn, "old")
    assert row is not None and (row["state"], row["next_poll_at"]) == ("expired", None)


def test_a_last_poll_that_resolves_every_number_completes_the_tag(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("late", sent_at=NOW - timedelta(hours=47))
    r.sim.set_number("late", "+331", "Waiting", date=unix(NOW - timedelta(hours=47)))
    assert r.poller.poll("late").state == "active"
    # The window closes; the last poll finds the number delivered: nothing is left to
    # expire, so the tag is complete, not expired.
    r.sim.set_number("late", "+331", "Delivered", date=unix(NOW - timedelta(minutes=30)))
    r.clock.now += timedelta(hours=2)
    result = r.poller.poll("late")
    assert (result.state, result.expired) == ("completed", 0)
    assert r.rows("late")["+331"]["status"] == "delivered"
    with r.engine.connect() as conn:
        row = tracking.get_tag(conn, "late")
    assert row is not None and (row["state"], row["next_poll_at"]) == ("completed", None)


def test_a_late_report_for_every_expired_number_completes_an_expired_tag(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.track("old", sent_at=NOW - timedelta(hours=50))
    r.sim.set_number("old", "+331", "Waiting", date=unix(NOW - timedelta(hours=50)))
    assert r.poller.poll("old").state == "expired"
    r.sim.set_number("old", "+331", "Delivered", date=unix(NOW - timedelta(minutes=5)))
    r.clock.now += timedelta(minutes=10)
    result = r.poller.poll("old")  # a manual `poll`: a late report beats our guess
    assert (result.state, result.counts) == ("completed", {"delivered": 1})


def test_a_tag_untracked_during_its_poll_stays_untracked(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("spring")
    r.sim.set_number("spring", "+331", "Waiting", date=unix(NOW))
    assert r.poller.poll("spring").state == "active"
    r.sim.set_number("spring", "+331", "Delivered", date=unix(NOW + timedelta(minutes=1)))
    r.sim.inject("slow", tag="spring", seconds=1.0)
    r.clock.now += timedelta(minutes=2)
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(r.poller.poll, "spring")
        deadline = time.monotonic() + 10
        while r.sim.request_count("spring") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the poll's request is on its way
        with r.engine.begin() as conn:
            tracking.untrack(conn, "spring", now=r.clock.now)
        result = polling.result(timeout=30)
    # What the poll fetched is kept, but the user's untrack stands: nothing is due.
    assert result.state == "untracked"
    assert r.rows("spring")["+331"]["status"] == "delivered"
    with r.engine.connect() as conn:
        row = tracking.get_tag(conn, "spring")
        later = r.clock.now + timedelta(days=1)
        due = tracking.claim_due(
            conn, now=later, owner="t", lease_until=later + timedelta(minutes=1), limit=10
        )
    assert row is not None and (row["state"], row["next_poll_at"]) == ("untracked", None)
    assert due == []


#: Makes a transaction that wrote a poll_runs row fail at COMMIT, not before: a
#: deferred check, the way a constraint or a lost connection can fail a commit.
FAIL_AT_COMMIT = {
    "sqlite": [
        "CREATE TABLE guard_parent (id INTEGER PRIMARY KEY)",
        "CREATE TABLE guard_child (parent INTEGER REFERENCES guard_parent (id)"
        " DEFERRABLE INITIALLY DEFERRED)",
        "CREATE TRIGGER guard AFTER INSERT ON poll_runs BEGIN"
        " INSERT INTO guard_child VALUES (1); END",
    ],
    "postgresql": [
        "CREATE FUNCTION guard() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'commit refused'; END $$",
        "CREATE CONSTRAINT TRIGGER guard AFTER INSERT ON poll_runs"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION guard()",
    ],
}


def test_a_poll_whose_commit_fails_announces_no_opt_out(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("stop")
    r.sim.set_number("stop", "+331", "Delivered", date=unix(NOW), stop_sms=True)
    with r.engine.begin() as conn:
        for statement in FAIL_AT_COMMIT[conn.dialect.name]:
            conn.exec_driver_sql(statement)
    # Even the failure cannot be recorded (the guard refuses every poll_runs row): one
    # error of ours, naming the poll and the database's refusal.
    with capture_logs() as logs, pytest.raises(StoreError, match="could not be recorded"):
        r.poller.poll("stop")
    assert [e for e in logs if e["event"] == "stop_sms.opt_out"] == []
    assert r.count(stop_sms_optouts) == 0


def test_resolved_tag_completes_after_the_settle_period(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.track("done", sent_at=NOW - timedelta(minutes=5))
    r.sim.set_number("done", "+331", "Delivered", date=unix(NOW))
    assert r.poller.poll("done").state == "active"  # too young to settle
    r.clock.now += timedelta(minutes=6)
    assert r.poller.poll("done").state == "completed"


def test_wrong_key_writes_no_statuses_and_marks_an_auth_error(rig: Callable[..., Rig]) -> None:
    r = rig(api_key="wrong-key-123")
    r.track("spring")
    r.sim.add_tag("spring", 10, sent_at=NOW)
    result = r.poller.poll("spring")
    assert result.outcome == "auth_error" and "API key" in (result.error or "")
    assert "wrong-key-123" not in (result.error or "")
    assert r.count(delivery_statuses) == 0


def test_tag_summary_always_equals_a_recount_of_the_numbers(rig: Callable[..., Rig]) -> None:
    # tag_summary reads the counts each poll keeps in tag_counts; after every kind of
    # poll they must equal what counting delivery_statuses gives (revision 0001's view).
    r = rig()
    sent = NOW - timedelta(hours=47)
    r.track("mix", sent_at=sent)

    def recount() -> dict[str, object]:
        query = f"SELECT * FROM ({TAG_SUMMARY_SQL_0001}) AS s WHERE tag = 'mix'"
        with r.engine.connect() as conn:
            return dict(conn.execute(sa.text(query)).mappings().one())

    def summary() -> dict[str, object]:
        with r.engine.connect() as conn:
            return dict(queries.tag_summary(conn, "mix")[0])

    def poll_and_compare() -> dict[str, object]:
        r.poller.poll("mix")
        shown, counted = summary(), recount()
        for column in ("total", "waiting", "delivered", "not_delivered", "failed", "expired"):
            assert shown[column] == counted[column], (column, shown, counted)
        assert (shown["unknown"], shown["stop_sms"]) == (counted["unknown"], counted["stop_sms"])
        assert shown["delivery_rate"] == counted["delivery_rate"]
        return shown

    assert poll_and_compare()["total"] == 0  # code 4: no numbers yet
    for n in range(6):
        r.sim.set_number("mix", f"+33{n}", "Waiting", date=unix(sent))
    r.sim.set_number("mix", "+339", "Sent", date=unix(sent))  # unknown
    assert poll_and_compare()["waiting"] == 6
    r.sim.set_number("mix", "+330", "Delivered", date=unix(sent + timedelta(minutes=1)))
    r.sim.set_number("mix", "+331", "Not delivered", date=unix(sent + timedelta(minutes=1)))
    r.sim.set_number("mix", "+332", "ko", date=unix(sent + timedelta(minutes=1)), stop_sms=True)
    r.sim.set_number("mix", "+333", "Waiting", date=unix(sent), stop_sms=True)  # STOP only
    assert poll_and_compare()["stop_sms"] == 2
    assert poll_and_compare()["delivered"] == 1  # unchanged re-poll: nothing rewritten
    r.sim.set_number("mix", "+330", "Waiting", date=unix(sent + timedelta(minutes=2)))
    r.sim.inject("500", tag="mix", times=None)
    r.poller.poll("mix")  # fails: counts untouched
    r.sim.clear_faults()
    assert poll_and_compare()["delivered"] == 1  # a final status never regresses
    r.clock.now = sent + timedelta(hours=48, minutes=1)  # the window has closed
    shown = poll_and_compare()
    assert (shown["state"], shown["expired"], shown["waiting"], shown["unknown"]) == (
        "expired",
        4,
        0,
        0,
    )
