"""One poll's diff against what is stored (:func:`daemon.diff.diff_reports`): which
numbers are written, which events and opt-outs follow, and the tag's counts after it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.db import sqlite_parse, sqlite_text
from daemon.diff import EVENT_KEYS, STATUS_KEYS, Diff, StoredState, Tally, diff_reports
from daemon.status import Report, Status

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SENT = NOW - timedelta(hours=1)
LATER = SENT + timedelta(minutes=5)
TAG = "spring"


def report(phone: str, status: Status, *, stop: bool = False, at: datetime | None = SENT) -> Report:
    provider = {Status.WAITING: "Waiting", Status.DELIVERED: "Delivered"}.get(status, "ko")
    return Report(phone, status, provider, stop, at)


def stored(*reports: Report) -> dict[str, StoredState]:
    """What the driver returns for these reports once stored (PostgreSQL's form)."""
    return {
        r.phone_number: (r.phone_number, r.status.value, r.stop_sms, r.reported_at) for r in reports
    }


def by_number(reports: list[Report]) -> dict[str, Report]:
    return {r.phone_number: r for r in reports}


def rows(flat: list[Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [
        dict(zip(keys, flat[i : i + len(keys)], strict=True))
        for i in range(0, len(flat), len(keys))
    ]


def events(diff: Diff) -> list[tuple[str, str | None, str]]:
    return [
        (e["phone_number"], e["old_status"], e["new_status"]) for e in rows(diff.events, EVENT_KEYS)
    ]


def written(diff: Diff) -> dict[str, str]:
    return {r["phone_number"]: r["status"] for r in rows(diff.rows, STATUS_KEYS)}


def test_a_first_poll_writes_every_number_and_leaves_its_events_to_the_database() -> None:
    polled = [report("+1", Status.DELIVERED), report("+2", Status.WAITING, stop=True)]
    diff = diff_reports(TAG, by_number(polled), {}, tally=None, now=NOW)
    assert written(diff) == {"+1": "delivered", "+2": "waiting"}
    first, second = rows(diff.rows, STATUS_KEYS)
    assert (first["first_seen_at"], first["resolved_at"], first["updated_at"]) == (NOW, NOW, NOW)
    assert second["resolved_at"] is None and second["stop_sms"] is True
    assert diff.events == [] and diff.copy_first_sightings and diff.event_count == 2
    assert [o["phone_number"] for o in diff.optouts] == ["+2"]
    assert diff.newly_final == [SENT]
    assert diff.tally == Tally({"delivered": 1, "waiting": 1}, 1)
    assert diff.changed == 2


def test_an_unchanged_re_poll_writes_nothing() -> None:
    polled = [report("+1", Status.DELIVERED), report("+2", Status.WAITING, stop=True)]
    diff = diff_reports(TAG, by_number(polled), stored(*polled), tally=None, now=NOW)
    assert (diff.rows, diff.events, diff.optouts, diff.newly_final) == ([], [], [], [])
    assert not diff.copy_first_sightings and diff.event_count == 0
    assert diff.tally == Tally({"delivered": 1, "waiting": 1}, 1)


def test_a_status_that_moves_gets_its_event_and_moves_the_counts() -> None:
    before = [report("+1", Status.WAITING), report("+2", Status.WAITING)]
    now = [report("+1", Status.DELIVERED, at=LATER), report("+2", Status.WAITING)]
    diff = diff_reports(TAG, by_number(now), stored(*before), tally=None, now=NOW)
    assert written(diff) == {"+1": "delivered"}
    assert events(diff) == [("+1", "waiting", "delivered")]
    assert diff.newly_final == [LATER]
    assert diff.tally == Tally({"delivered": 1, "waiting": 1}, 0)


def test_a_final_status_is_never_replaced_by_waiting() -> None:
    before = [report("+1", Status.DELIVERED)]
    diff = diff_reports(
        TAG,
        by_number([report("+1", Status.WAITING, at=LATER)]),
        stored(*before),
        tally=None,
        now=NOW,
    )
    assert (diff.rows, diff.events) == ([], [])
    assert diff.tally == Tally({"delivered": 1}, 0)


def test_stop_turning_on_writes_the_number_and_an_opt_out_but_no_event() -> None:
    before = [report("+1", Status.DELIVERED)]
    diff = diff_reports(
        TAG,
        by_number([report("+1", Status.DELIVERED, stop=True)]),
        stored(*before),
        tally=None,
        now=NOW,
    )
    assert written(diff) == {"+1": "delivered"} and events(diff) == []
    assert [(o["phone_number"], o["tag"], o["first_seen_at"]) for o in diff.optouts] == [
        ("+1", TAG, NOW)
    ]
    assert diff.tally == Tally({"delivered": 1}, 1)


def test_a_new_number_on_a_re_poll_brings_its_own_first_sighting_event() -> None:
    before = [report("+1", Status.DELIVERED)]
    polled = [*before, report("+2", Status.WAITING)]
    diff = diff_reports(TAG, by_number(polled), stored(*before), tally=None, now=NOW)
    assert written(diff) == {"+2": "waiting"}
    assert events(diff) == [("+2", None, "waiting")] and not diff.copy_first_sightings
    assert diff.event_count == 1


def test_with_a_tally_only_the_numbers_polled_are_compared_and_counted_from_it() -> None:
    # A remembered answer: 998 numbers already counted, only "+1" sent back and read.
    tally = Tally({"delivered": 990, "waiting": 10}, 4)
    diff = diff_reports(
        TAG,
        by_number([report("+1", Status.FAILED, at=LATER)]),
        stored(report("+1", Status.WAITING)),
        tally=tally,
        now=NOW,
    )
    assert events(diff) == [("+1", "waiting", "failed")]
    assert diff.tally == Tally({"delivered": 990, "waiting": 9, "failed": 1}, 4)


def test_stored_values_in_sqlites_form_compare_equal_to_the_same_report() -> None:
    polled = [report("+1", Status.DELIVERED), report("+2", Status.WAITING, at=None)]
    as_sqlite = {
        phone: (phone, status, stop, None if at is None else sqlite_text(at))
        for phone, status, stop, at in stored(*polled).values()
    }

    def to_db(value: datetime | None) -> str | None:
        return None if value is None else sqlite_text(value)

    unchanged = diff_reports(
        TAG, by_number(polled), as_sqlite, tally=None, now=NOW, to_db=to_db, from_db=sqlite_parse
    )
    assert unchanged.rows == []
    later = [report("+1", Status.NOT_DELIVERED, at=LATER)]
    moved = diff_reports(
        TAG, by_number(later), as_sqlite, tally=None, now=NOW, to_db=to_db, from_db=sqlite_parse
    )
    [row] = rows(moved.rows, STATUS_KEYS)
    assert (row["status"], row["reported_at"], row["updated_at"]) == (
        "not_delivered",
        sqlite_text(LATER),
        sqlite_text(NOW),
    )
