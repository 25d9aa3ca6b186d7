"""The account's STOP list end to end: the simulator's ``/v1/stop-sms/list`` (or a
scripted provider where exact pages matter), real SQLite and PostgreSQL, the CLI verbs
through ``main(argv)``, the daemon's schedule on an injected clock."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from daemon.app import App
from daemon.db import UtcDateTime, account_optouts, stop_list_syncs, stop_sms_optouts
from daemon.health import Health
from daemon.metrics import Metrics
from daemon.scheduler import Daemon
from daemon.settings import load_settings
from daemon.simulator import STOP_LIST_PATH, STOP_LIST_TAG, Simulator
from tests.conftest import PgServer, pg_database
from tests.helpers import API_KEY, assert_clean, refuse_rows, run_cli, wait_for
from tests.integration.conftest import NOW, Clock, Rig

WINTER = datetime(2026, 1, 15, 9, 19, 45, tzinfo=UTC)  # 10:19:45 in Paris (CET)
SUMMER = datetime(2026, 7, 20, 8, 19, 45, tzinfo=UTC)  # 10:19:45 in Paris (CEST)


# --- helpers ------------------------------------------------------------------------------


def account(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(account_optouts)).mappings()
        return {r["phone_number"]: dict(r) for r in rows}


def syncs(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        query = sa.select(stop_list_syncs).order_by(stop_list_syncs.c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def suppression(engine: Engine) -> dict[str, tuple[datetime, bool, int]]:
    """The view, typed as BI tools read it."""
    query = sa.text("SELECT * FROM suppression_list").columns(first_opted_out_at=UtcDateTime())
    with engine.connect() as conn:
        return {
            r.phone_number: (r.first_opted_out_at, bool(r.on_account_list), int(r.stop_tags))
            for r in conn.execute(query)
        }


def recount(engine: Engine) -> dict[str, tuple[datetime, bool, int]]:
    """What ``suppression_list`` must say, recounted in Python from both tables."""
    found: dict[str, list[Any]] = {}
    with engine.connect() as conn:
        for r in conn.execute(sa.select(account_optouts)).mappings():
            times = [t for t in (r["listed_at"], r["first_seen_at"]) if t is not None]
            found[r["phone_number"]] = [min(times), r["removed_at"] is None, 0]
        for r in conn.execute(sa.select(stop_sms_optouts)).mappings():
            times = [t for t in (r["reported_at"], r["first_seen_at"]) if t is not None]
            entry = found.setdefault(r["phone_number"], [min(times), False, 0])
            entry[0] = min(entry[0], *times)
            entry[2] += 1
    return {phone: (e[0], e[1], e[2]) for phone, e in found.items()}


def list_requests(sim: Simulator) -> int:
    return sum(1 for r in sim.requests if r.path == STOP_LIST_PATH)


def assert_view_agrees(engine: Engine) -> None:
    assert suppression(engine) == recount(engine)


# --- syncing against the simulator ------------------------------------------------------------


def test_a_list_over_several_pages_is_stored_whole_with_paris_times_as_utc(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.sim.page_size = 4
    phones = [f"+336000000{i:02d}" for i in range(10)]
    for i, phone in enumerate(phones[:8]):
        r.sim.add_stop_number(phone, at=NOW - timedelta(days=10 - i))
    r.sim.add_stop_number(phones[8], at=WINTER)
    r.sim.add_stop_number(phones[9], at=SUMMER)
    r.clock.now = r.sim.now()

    result = r.app.stop_list.sync_now()

    assert (result.ok, result.pages, result.summary) == (True, 3, "listed 10, added 10, removed 0")
    assert list_requests(r.sim) == 3
    rows = account(r.engine)
    assert set(rows) == set(phones)
    assert rows[phones[8]]["listed_at"] == WINTER  # "2026-01-15 10:19:45" Paris
    assert rows[phones[9]]["listed_at"] == SUMMER  # "2026-07-20 10:19:45" Paris
    assert all(row["removed_at"] is None and row["provider_id"] for row in rows.values())
    assert [s["outcome"] for s in syncs(r.engine)] == ["ok"]
    assert_view_agrees(r.engine)


def test_a_number_removed_then_listed_again(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.sim.add_tag("spring", 3)
    r.sim.set_number("spring", "+33699990001", "Delivered", stop_sms=True)
    r.track("spring")
    r.clock.now = r.sim.now()
    assert r.poller.poll("spring").ok  # a per-tag STOP: in the view with stop_tags 1
    for phone in ("+33699990001", "+33699990002", "+33699990003"):
        r.sim.add_stop_number(phone, at=r.sim.now() - timedelta(hours=1))
    assert r.app.stop_list.sync_now().summary == "listed 3, added 3, removed 0"
    assert_view_agrees(r.engine)

    r.sim.remove_stop_number("+33699990002")
    r.clock.now += timedelta(hours=1)
    assert r.app.stop_list.sync_now().summary == "listed 2, added 0, removed 1"
    removed = account(r.engine)["+33699990002"]
    assert removed["removed_at"] == r.clock.now
    view = suppression(r.engine)
    assert view["+33699990002"][1] is False  # kept, but no longer on the account's list
    assert view["+33699990001"][1:] == (True, 1)
    assert_view_agrees(r.engine)

    r.sim.add_stop_number("+33699990002")
    r.clock.now += timedelta(hours=1)
    assert r.app.stop_list.sync_now().summary == "listed 3, added 1, removed 0"
    again = account(r.engine)["+33699990002"]
    assert again["removed_at"] is None
    assert again["first_seen_at"] == removed["first_seen_at"]
    assert suppression(r.engine)["+33699990002"][1] is True
    assert_view_agrees(r.engine)

    # Nothing changed: nothing rewritten, nothing counted.
    before = account(r.engine)
    assert r.app.stop_list.sync_now().summary == "listed 3, added 0, removed 0"
    assert account(r.engine) == before


def test_a_wrong_key_or_an_echoed_key_changes_nothing_and_never_shows(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.sim.add_stop_number("+33699990001", at=NOW - timedelta(days=1))
    assert r.app.stop_list.sync_now().ok
    before = account(r.engine)
    r.sim.remove_stop_number("+33699990001")
    with capture_logs() as logs:
        r.sim.inject("wrong_key", tag=STOP_LIST_TAG)
        first = r.app.stop_list.sync_now()
        r.sim.inject("echo_key", tag=STOP_LIST_TAG)
        second = r.app.stop_list.sync_now()
        r.sim.inject("echo_key_html", tag=STOP_LIST_TAG, times=None)
        third = r.app.stop_list.sync_now()
    assert [first.outcome, second.outcome, third.outcome] == [
        "auth_error",
        "auth_error",
        "api_error",
    ]
    assert account(r.engine) == before
    stored = syncs(r.engine)
    assert [s["outcome"] for s in stored] == ["ok", "auth_error", "auth_error", "api_error"]
    assert_clean(repr(logs), repr(stored))
    assert [e["event"] for e in logs].count("stop_list.sync_failed") == 3


def test_a_server_ignoring_page_or_lying_about_nb_data_removes_nothing(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.sim.page_size = 2
    for i in range(5):
        r.sim.add_stop_number(f"+3369999000{i}", at=NOW - timedelta(days=1, minutes=i))
    assert r.app.stop_list.sync_now().summary == "listed 5, added 5, removed 0"
    before = account(r.engine)

    # Page 2 repeats page 1 while nbData says 5: the rest cannot be told apart from gone.
    r.sim.inject("ignore_page", tag=STOP_LIST_TAG, times=None)
    result = r.app.stop_list.sync_now()
    assert (result.outcome, result.listed) == ("truncated", 2)
    assert account(r.engine) == before
    r.sim.clear_faults()

    # nbData lying low (1) stops nothing: the pages run until one comes back empty.
    r.sim.inject("lying_total", tag=STOP_LIST_TAG, times=None, total=1)
    assert r.app.stop_list.sync_now().summary == "listed 5, added 0, removed 0"
    assert account(r.engine) == before


# --- a scripted provider: exact pages and failures part-way ------------------------------------


class Script:
    """A provider answering ``/stop-sms/list`` page by page from a list of numbers, with a
    fault on chosen pages (every attempt: retries do not help)."""

    def __init__(self, phones: list[str], page_size: int = 3) -> None:
        self.phones = phones
        self.page_size = page_size
        self.faults: dict[int, str] = {}
        self.requests: list[int] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/stop-sms/list"
        page = int(request.url.params.get("page", "1"))
        self.requests.append(page)
        start = (page - 1) * self.page_size
        data = [
            {"id": start + i + 1, "phoneNumber": p, "createdAt": "2026-01-15 10:19:45"}
            for i, p in enumerate(self.phones[start : start + self.page_size])
        ]
        body = json.dumps({"success": True, "code": 200, "nbData": len(self.phones), "data": data})
        fault = self.faults.get(page)
        if fault == "500":
            return httpx.Response(500, text="Internal Server Error")
        if fault == "truncated":
            return httpx.Response(200, content=body[: len(body) // 2].encode())
        if fault == "wrong_key":  # echoing the key, as careless providers do
            error = {"success": False, "code": 10, "message": f"Incorrect API Key {API_KEY}"}
            return httpx.Response(200, json=error)
        return httpx.Response(200, content=body.encode())


@pytest.fixture
def scripted(db_url: str) -> Iterator[Callable[..., tuple[App, Script]]]:
    apps: list[App] = []

    def build(phones: list[str], **overrides: Any) -> tuple[App, Script]:
        script = Script(phones)
        values: dict[str, Any] = dict(
            api_key=API_KEY,
            base_url="http://provider.test/v1",
            database_url=db_url,
            retry_backoff_seconds=0.01,
            rate_limit_per_second=0,
            max_retries=2,
        )
        values.update(overrides)
        app = App(
            load_settings({}, **values),
            clock=Clock(),
            transport=httpx.MockTransport(script.handler),
        )
        apps.append(app)
        return app, script

    yield build
    for app in apps:
        app.close()


PHONES = [f"+3361000000{i}" for i in range(8)]


@pytest.mark.parametrize("fault", ["500", "truncated", "wrong_key"])
def test_a_sync_failing_part_way_leaves_the_table_exactly_as_it_was(
    scripted: Callable[..., tuple[App, Script]], fault: str
) -> None:
    app, script = scripted(PHONES)
    assert app.stop_list.sync_now().summary == "listed 8, added 8, removed 0"
    assert script.requests == [1, 2, 3]
    before = account(app.engine)
    view = suppression(app.engine)

    script.phones = [*PHONES[3:], "+33620000000", "+33620000001"]  # 3 gone, 2 new
    script.faults[2] = fault
    script.requests.clear()
    with capture_logs() as logs:
        result = app.stop_list.sync_now()

    assert script.requests[0] == 1 and set(script.requests) == {1, 2}  # stopped at page 2
    expected = {"500": "transient_error", "truncated": "transient_error"}
    assert result.outcome == expected.get(fault, "auth_error")
    assert account(app.engine) == before
    assert suppression(app.engine) == view
    assert syncs(app.engine)[-1]["outcome"] == result.outcome
    assert_clean(repr(logs), repr(syncs(app.engine)), result.error or "")

    script.faults.clear()  # the next sync applies the list whole
    assert app.stop_list.sync_now().summary == "listed 7, added 2, removed 3"
    assert_view_agrees(app.engine)


def test_a_sync_that_crashes_is_recorded_and_waits_an_interval(
    scripted: Callable[..., tuple[App, Script]],
) -> None:
    app, script = scripted(PHONES)
    assert app.stop_list.sync_now().ok
    before = account(app.engine)
    clock = app.clock
    assert isinstance(clock, Clock)
    clock.now += app.stop_list.interval  # the next sync is due
    script.phones = [*PHONES, "+33620000009"]
    refuse_rows(app.engine, "account_optouts", "phone_number", "+33620000009")
    with capture_logs() as logs:
        result = app.stop_list.sync_now()

    assert result.outcome == "transient_error"
    assert (
        result.error and result.error.startswith("unexpected ") and "poisoned row" in result.error
    )
    assert account(app.engine) == before  # nothing applied
    assert syncs(app.engine)[-1]["outcome"] == "transient_error"
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["stop_list.sync_failed"]  # one line
    # Recorded, so the daemon's next look does not fetch the whole list again.
    requests = len(script.requests)
    assert app.stop_list.sync_if_due() is None
    assert len(script.requests) == requests
    assert_clean(repr(logs), repr(syncs(app.engine)))


def test_a_list_longer_than_max_pages_is_truncated_and_changes_nothing(
    scripted: Callable[..., tuple[App, Script]],
) -> None:
    app, script = scripted(PHONES[:3])
    assert app.stop_list.sync_now().ok
    before = account(app.engine)
    script.phones = PHONES  # 3 pages now, and only 2 allowed
    app.close()
    app2, script2 = scripted(PHONES, max_pages=2, database_url=str(app.engine.url))
    with capture_logs() as logs:
        result = app2.stop_list.sync_now()
    loud = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    assert loud == ["stop_list.sync_failed"]  # one line says it all
    assert (result.outcome, result.listed, script2.requests) == ("truncated", 6, [1, 2])
    assert "SMSPARTNER_MAX_PAGES=2" in (result.error or "")
    assert account(app2.engine) == before
    assert syncs(app2.engine)[-1]["outcome"] == "truncated"


# --- when it runs ---------------------------------------------------------------------------------


def test_run_once_syncs_only_when_the_last_success_is_an_interval_old(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    r = rig(stop_list_interval_minutes=60)
    r.sim.add_stop_number("+33699990001", at=NOW - timedelta(days=1))

    def once() -> Daemon:
        daemon = r.daemon()
        stopping.append(daemon)
        daemon.run_once()
        return daemon

    assert once().stats.stop_list is not None
    assert list_requests(r.sim) == 1
    r.clock.now += timedelta(minutes=59)
    assert once().stats.stop_list is None  # the last success is fresh
    r.sim.inject("500", tag=STOP_LIST_TAG, times=None)
    r.clock.now += timedelta(minutes=2)
    failed = once().stats.stop_list
    assert failed is not None and failed.outcome == "transient_error"
    r.sim.clear_faults()
    r.clock.now += timedelta(minutes=1)
    assert once().stats.stop_list is not None  # a failure is no success: still stale
    assert [s["outcome"] for s in syncs(r.engine)] == ["ok", "transient_error", "ok"]


def test_an_interval_of_zero_never_syncs(rig: Callable[..., Rig], stopping: list[Daemon]) -> None:
    r = rig(stop_list_interval_minutes=0)
    daemon = r.daemon()
    stopping.append(daemon)
    assert daemon.run_once().stop_list is None
    assert list_requests(r.sim) == 0


def test_run_once_exit_code_and_summary(cli_env: dict[str, str], simulator: Simulator) -> None:
    simulator.add_stop_number("+33699990001", at=NOW)
    simulator.inject("wrong_key", tag=STOP_LIST_TAG, times=None)
    res = run_cli("run", "--once", env=cli_env)
    assert res.code == 1
    assert "error: sync of the account's STOP list failed: SMS Partner rejected" in res.err
    assert_clean(res.out, res.err)
    simulator.clear_faults()
    res = run_cli("run", "--once", env=cli_env)  # the last success is none: stale
    assert res.code == 0, res.err
    assert "synced the account's STOP list: listed 1, added 1, removed 0" in res.out


def test_the_daemon_syncs_at_start_and_a_failing_sync_stops_neither_polling_nor_readiness(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    r = rig()
    r.sim.add_tag("spring", 5)
    r.track("spring")
    r.clock.now = r.sim.now()
    r.sim.inject("500", tag=STOP_LIST_TAG, times=None)
    health = Health(r.clock)
    daemon = r.daemon(health)
    stopping.append(daemon)
    with capture_logs() as logs:
        daemon.start()
        wait_for(lambda: syncs(r.engine), 10, "the sync at start")
        wait_for(lambda: r.sim.request_count("spring"), 10, "a poll")
        daemon.stop()
    assert syncs(r.engine)[0]["outcome"] == "transient_error"
    assert len(r.rows("spring")) == 5
    assert health.problems() == []
    failed = [e for e in logs if e["event"] == "stop_list.sync_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"


def test_a_rejected_key_pauses_the_sync_as_it_pauses_polling(
    rig: Callable[..., Rig], stopping: list[Daemon]
) -> None:
    r = rig(api_key="wrong-key-777")
    r.sim.add_tag("spring", 5)
    r.track("spring")
    daemon = r.daemon()
    stopping.append(daemon)
    daemon.dispatch()  # polling finds the key rejected and pauses
    wait_for(lambda: daemon.polls_in_flight == 0, 10, "the poll")
    daemon._sync_stop_list()  # the job, as APScheduler calls it
    assert list_requests(r.sim) == 0
    assert syncs(r.engine) == []


# --- replicas on PostgreSQL -------------------------------------------------------------------


@pytest.mark.postgres
def test_two_replicas_on_postgresql_sync_once_per_interval(
    pg_server: PgServer, simulator: Simulator
) -> None:
    simulator.add_stop_number("+33699990001", at=NOW - timedelta(days=1))
    clock = Clock()
    with pg_database(pg_server) as url:
        settings = load_settings(
            {},
            api_key=API_KEY,
            base_url=simulator.url,
            database_url=url,
            rate_limit_per_second=0,
            retry_backoff_seconds=0.01,
        )
        a, b = App(settings, clock=clock), App(settings, clock=clock)
        try:
            a.engine, b.engine  # noqa: B018 (migrated before the race)
            simulator.inject("slow", tag=STOP_LIST_TAG, seconds=0.5)
            results: list[object] = []
            first = threading.Thread(target=lambda: results.append(a.stop_list.sync_if_due()))
            first.start()
            wait_for(lambda: list_requests(simulator), 5, "replica a's request")
            with capture_logs() as logs:
                assert b.stop_list.sync_if_due() is None  # a is syncing: b skips quietly
            first.join()
            assert not [e for e in logs if e["log_level"] in ("warning", "error")]
            assert b.stop_list.sync_if_due() is None  # a synced: not due for b
            assert list_requests(simulator) == 1

            for _ in range(3):  # every interval, one sync between them
                clock.now += timedelta(minutes=60)
                done = [b.stop_list.sync_if_due(), a.stop_list.sync_if_due()]
                assert sum(r is not None for r in done) == 1
            assert list_requests(simulator) == 4
            assert len(syncs(a.engine)) == 4
        finally:
            a.close()
            b.close()


# --- CLI -----------------------------------------------------------------------------------------


def test_optouts_sync_and_account(cli_env: dict[str, str], simulator: Simulator) -> None:
    simulator.add_stop_number("+33699990001", at=WINTER)
    simulator.add_stop_number("+33699990002", at=SUMMER)
    res = run_cli("optouts", "--sync", env=cli_env)
    assert res.code == 0, res.err
    assert res.out.splitlines()[0] == "listed 2, added 2, removed 0"
    assert "(none)" in res.out  # then the per-tag opt-outs, as usual: none yet

    simulator.remove_stop_number("+33699990001")
    res = run_cli("optouts", "--sync", "--account", env=cli_env)
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0] == "listed 1, added 0, removed 1"
    assert "2026-01-15T09:19:45Z" in res.out and "2026-07-20T08:19:45Z" in res.out
    assert "last sync" in lines[-1] and "ok, listed 1, added 0, removed 1" in lines[-1]

    res = run_cli("optouts", "--account", "--json", env=cli_env)
    rows = {row["phone_number"]: row for row in json.loads(res.out)}
    assert rows["+33699990001"]["removed_at"] is not None
    assert rows["+33699990002"] == {
        "phone_number": "+33699990002",
        "provider_id": rows["+33699990002"]["provider_id"],
        "listed_at": "2026-07-20T08:19:45Z",
        "first_seen_at": rows["+33699990002"]["first_seen_at"],
        "removed_at": None,
    }
    assert json.loads(run_cli("optouts", "--json", env=cli_env).out) == []  # plain: per tag

    # CSV of the account list; with --sync its summary goes to stderr, stdout stays CSV.
    simulator.add_stop_number("+33699990003", at=WINTER)
    res = run_cli("optouts", "--sync", "--account", "--csv", env=cli_env)
    assert res.code == 0, res.err
    assert res.err.splitlines()[-1] == "listed 2, added 1, removed 0"
    csv_rows = list(csv.DictReader(io.StringIO(res.out, newline="")))
    assert [r["phone_number"] for r in csv_rows] == ["+33699990001", "+33699990003", "+33699990002"]
    assert list(csv_rows[0]) == [
        "phone_number",
        "provider_id",
        "listed_at",
        "first_seen_at",
        "removed_at",
    ]
    assert csv_rows[1]["removed_at"] == "" and csv_rows[0]["removed_at"].endswith("Z")
    res = run_cli("optouts", "--sync", "--account", "--csv", "--json", env=cli_env)
    assert res.code == 2 and res.out == ""


def test_optouts_sync_exit_codes(cli_env: dict[str, str], simulator: Simulator) -> None:
    simulator.inject("500", tag=STOP_LIST_TAG, times=None)
    res = run_cli("optouts", "--sync", env=cli_env)
    assert (res.code, res.out) == (1, "")
    assert res.err.splitlines()[-1].startswith(
        "error: GET /v1/stop-sms/list page=1: SMS Partner answered HTTP 500 (gave up after"
    )
    simulator.clear_faults()

    res = run_cli("optouts", "--sync", env=cli_env | {"SMSPARTNER_API_KEY": "wrong-key-777"})
    assert res.code == 1 and "rejected the API key" in res.err

    res = run_cli("optouts", "--sync", env=cli_env | {"SMSPARTNER_PROVIDER_TIMEZONE": "Paris"})
    assert res.code == 2
    assert res.err == (
        "error: SMSPARTNER_PROVIDER_TIMEZONE: 'Paris' is not a time zone name like "
        "Europe/Paris (IANA tz database)\n"
    )
    res = run_cli("optouts", "--sync", env=cli_env | {"SMSPARTNER_API_KEY": ""})
    assert res.code == 2 and "SMSPARTNER_API_KEY" in res.err
    for r in (res,):
        assert_clean(r.out, r.err)


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_count_syncs_by_outcome_and_gauge_the_list(rig: Callable[..., Rig]) -> None:
    r = rig()
    app = App(r.app.settings, clock=r.clock, service=True)
    try:
        r.sim.add_stop_number("+33699990001", at=NOW - timedelta(days=1))
        r.sim.add_stop_number("+33699990002", at=NOW - timedelta(days=1))
        assert app.stop_list.sync_now().ok
        r.sim.inject("500", tag=STOP_LIST_TAG, times=None)
        app.stop_list.sync_now()
        metrics: Metrics = app.metrics
        with app.engine.connect() as conn:
            metrics.refresh(conn, r.clock.now)
        text = metrics.render()[0].decode()
    finally:
        app.close()
    assert 'smspartner_status_stop_list_syncs_total{outcome="ok"} 1.0' in text
    assert 'smspartner_status_stop_list_syncs_total{outcome="transient_error"} 1.0' in text
    assert 'smspartner_status_stop_list_syncs_total{outcome="truncated"} 0.0' in text
    assert "smspartner_status_account_optouts 2.0" in text
    (last_ok,) = re.findall(
        r"^smspartner_status_stop_list_last_success_timestamp_seconds (\S+)$", text, re.M
    )
    assert float(last_ok) == NOW.timestamp()


# --- the simulator and the demo ------------------------------------------------------------------


def test_the_simulator_lists_stop_answers_late_opt_outs_and_removals_over_time() -> None:
    """Its campaigns' STOP numbers (when their reports arrive), some opt-outs their
    reports never show (after the 48-hour window, or added by hand), some removed later."""
    sent = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    with Simulator(seed=3, clock=lambda: sent) as sim:
        phones = sim.add_tag("spring", 20000, sent_at=sent)
        at_48h = dict(sim.stop_list(sent + timedelta(hours=48)))
        at_96h = dict(sim.stop_list(sent + timedelta(hours=96)))
        reports = sim.truth("spring", sent + timedelta(hours=96))
    stopped = {p for p, (_, stop, _) in reports.items() if stop}
    assert sim.stop_list(sent) == []
    late = set(at_96h) - stopped
    assert late and late <= set(phones)  # opt-outs the reports never show
    assert any(at_96h[p] > sent + timedelta(hours=48) for p in late)  # some after the window
    assert set(at_48h) - set(at_96h)  # some removed meanwhile
    assert all(at_96h[p] >= sent for p in at_96h)


def test_the_demo_shows_the_account_list_in_its_summary(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    res = run_cli(
        "demo", "--database", str(tmp_path / "demo.db"), "--seconds", "2", env=cli_env, timeout=60
    )
    assert res.code == 0, res.err
    assert re.search(
        r"^account STOP list: [1-9]\d* number\(s\) listed, \d+ removed since .*"
        r"suppression_list: [1-9]\d* number\(s\)$",
        res.out,
        re.M,
    ), res.out


# --- docs/bi.md ----------------------------------------------------------------------------------

BI_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "bi.md"


def test_the_never_text_query_of_the_bi_guide(db_url: str) -> None:
    """The guide's "numbers we must never text", on both engines: listed now, a STOP the
    list has not caught up with, and a STOP after the list dropped the number; not a
    number the account's owner took off the list since."""
    (sql,) = re.findall(
        r"^```sql\n(-- Numbers we must never text\..*?)^```", BI_GUIDE.read_text(), re.M | re.S
    )
    day = timedelta(days=1)
    with App(load_settings({}, database_url=db_url)) as app:
        with app.engine.begin() as conn:
            listed = {"+listed": (9, 9, None), "+resubscribed": (9, 8, 5)}
            listed["+stopped-again"] = (None, 8, 5)  # (listed, first seen, removed): days ago
            for phone, (since, seen, removed) in listed.items():
                conn.execute(
                    sa.insert(account_optouts).values(
                        phone_number=phone,
                        listed_at=None if since is None else NOW - since * day,
                        first_seen_at=NOW - seen * day,
                        removed_at=None if removed is None else NOW - removed * day,
                    )
                )
            conn.execute(
                sa.insert(stop_sms_optouts),
                [
                    {"phone_number": "+stop-only", "tag": "a", "first_seen_at": NOW - day},
                    {"phone_number": "+resubscribed", "tag": "a", "first_seen_at": NOW - 7 * day},
                    {"phone_number": "+stopped-again", "tag": "b", "first_seen_at": NOW - day},
                ],
            )
        with app.engine.connect() as conn:
            rows = conn.execute(sa.text(sql)).all()
        assert_view_agrees(app.engine)
        assert suppression(app.engine)["+resubscribed"] == (NOW - 9 * day, False, 1)
    assert [r.phone_number for r in rows] == ["+listed", "+stopped-again", "+stop-only"]
