"""The pure core: status mapping, the forward-only rule, cadence, window, completion."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from daemon.status import (
    LATEST_SENT_AT,
    MAX_REPORT_WINDOW,
    Report,
    Status,
    is_complete,
    map_provider_status,
    merge_reports,
    next_poll_at,
    parse_cadence,
    parse_duration,
    parse_provider_date,
    parse_sent_at,
    plausible_report_date,
    supersedes,
    tag_problem,
    tag_warnings,
)

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
CADENCE = parse_cadence("15m=1m,2h=5m,12h=15m,48h=1h")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Delivered", Status.DELIVERED),
        ("delivered", Status.DELIVERED),
        ("  DELIVERED ", Status.DELIVERED),
        ("Not delivered", Status.NOT_DELIVERED),
        ("not  delivered", Status.NOT_DELIVERED),
        ("ko", Status.FAILED),
        ("KO", Status.FAILED),
        ("Waiting", Status.WAITING),
        ("waiting", Status.WAITING),
        ("Sent", Status.UNKNOWN),
        ("", Status.UNKNOWN),
    ],
)
def test_provider_statuses_map_case_insensitively(raw: str, expected: Status) -> None:
    assert map_provider_status(raw) is expected


def r(status: Status, minute: int | None = None, stop: bool = False, phone: str = "+1") -> Report:
    at = T0 + timedelta(minutes=minute) if minute is not None else None
    return Report(phone, status, status.value, stop, at)


def test_final_never_goes_back_to_pending() -> None:
    for final in (Status.DELIVERED, Status.NOT_DELIVERED, Status.FAILED, Status.EXPIRED):
        for pending in (Status.WAITING, Status.UNKNOWN):
            assert not supersedes(r(pending, 99), r(final, 1))


def test_between_finals_the_strictly_later_report_wins() -> None:
    assert supersedes(r(Status.DELIVERED, 2), r(Status.NOT_DELIVERED, 1))
    assert not supersedes(r(Status.DELIVERED, 1), r(Status.NOT_DELIVERED, 2))
    assert not supersedes(r(Status.DELIVERED, 1), r(Status.NOT_DELIVERED, 1))
    assert not supersedes(r(Status.DELIVERED, None), r(Status.NOT_DELIVERED, 1))
    assert supersedes(r(Status.DELIVERED, 1), r(Status.NOT_DELIVERED, None))


def test_provider_final_beats_expired_and_stop_only_turns_on() -> None:
    assert supersedes(r(Status.DELIVERED, None), r(Status.EXPIRED))
    assert not supersedes(r(Status.WAITING), r(Status.EXPIRED))
    assert supersedes(r(Status.DELIVERED, 1, stop=True), r(Status.DELIVERED, 1))
    assert not supersedes(r(Status.DELIVERED, 1), r(Status.DELIVERED, 1, stop=True))


def test_between_pending_reports_the_later_one_wins_then_unknown_beats_waiting() -> None:
    at = T0 + timedelta(minutes=5)
    sent = Report("+1", Status.UNKNOWN, "Sent", False, at)
    assert supersedes(Report("+1", Status.UNKNOWN, "Queued", False, at + timedelta(1)), sent)
    assert supersedes(Report("+1", Status.WAITING, "Waiting", False, at + timedelta(1)), sent)
    assert not supersedes(Report("+1", Status.UNKNOWN, "Queued", False, at), sent)  # keep
    assert not supersedes(Report("+1", Status.WAITING, "Waiting", False, at), sent)
    assert supersedes(sent, Report("+1", Status.WAITING, "Waiting", False, at))


def test_a_later_final_report_with_the_same_status_moves_the_date() -> None:
    assert supersedes(r(Status.DELIVERED, 9), r(Status.DELIVERED, 3))
    assert not supersedes(r(Status.DELIVERED, 3), r(Status.DELIVERED, 9))


def test_duplicates_in_one_poll_keep_the_most_advanced_status_in_any_order() -> None:
    reports = [r(Status.WAITING, 0), r(Status.DELIVERED, 3, stop=True), r(Status.WAITING, 4)]
    results = {tuple(merge_reports(p).values()) for p in itertools.permutations(reports)}
    assert results == {(r(Status.DELIVERED, 3, stop=True),)}


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [
        (Status.NOT_DELIVERED, Status.DELIVERED, Status.DELIVERED),
        (Status.FAILED, Status.DELIVERED, Status.DELIVERED),
        (Status.FAILED, Status.NOT_DELIVERED, Status.NOT_DELIVERED),
        (Status.WAITING, Status.UNKNOWN, Status.UNKNOWN),
    ],
)
@pytest.mark.parametrize("minute", [5, None], ids=["same date", "both undated"])
def test_one_answer_with_two_reports_at_one_date_keeps_the_same_one_in_either_order(
    first: Status, second: Status, kept: Status, minute: int | None
) -> None:
    a, b = r(first, minute), r(second, minute)
    assert merge_reports([a, b])["+1"].status is kept
    assert merge_reports([b, a])["+1"].status is kept


def test_the_same_status_spelled_twice_keeps_one_spelling_in_either_order() -> None:
    a = Report("+1", Status.DELIVERED, "Delivered", False, T0)
    b = Report("+1", Status.DELIVERED, "delivered", True, T0)
    assert merge_reports([a, b]) == merge_reports([b, a])
    assert merge_reports([a, b])["+1"].stop_sms is True


def test_across_polls_an_equal_date_still_keeps_what_is_stored() -> None:
    # The in-answer tie-break is not the store's rule (design.md): equal dates keep it.
    assert not supersedes(r(Status.DELIVERED, 5), r(Status.NOT_DELIVERED, 5))


@pytest.mark.parametrize(
    ("when", "plausible"),
    [
        (datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), False),
        (datetime(2000, 1, 1, tzinfo=UTC), True),
        (T0, True),
        (T0 + timedelta(days=1), True),
        (T0 + timedelta(days=1, seconds=1), False),
        (datetime(5138, 11, 16, tzinfo=UTC), False),
    ],
)
def test_provider_dates_from_2000_to_a_day_ahead_are_plausible(
    when: datetime, plausible: bool
) -> None:
    assert plausible_report_date(when, T0) is plausible


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1517989111", datetime(2018, 2, 7, 7, 38, 31, tzinfo=UTC)),
        (1517989111, datetime(2018, 2, 7, 7, 38, 31, tzinfo=UTC)),
        (" 1517989111 ", datetime(2018, 2, 7, 7, 38, 31, tzinfo=UTC)),
        ("garbage", None),
        ("", None),
        (None, None),
        (True, None),
        ("-5", None),
        ("1e30", None),
        ([], None),
        (10**400, None),  # float() overflows
        ("\ud800", None),
    ],
)
def test_provider_dates_parse_or_become_none(raw: object, expected: datetime | None) -> None:
    assert parse_provider_date(raw) == expected


@pytest.mark.parametrize(
    ("tag", "problem"),
    [
        ("spring-sale", None),
        ("", "empty"),
        ("a b", "whitespace"),
        ("x" * 65, "at most 64"),
        ("tab\x07", "printable"),
        ("x" * 64, None),
    ],
)
def test_tag_validation(tag: str, problem: str | None) -> None:
    found = tag_problem(tag)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_tag_warnings_follow_the_provider_documentation() -> None:
    assert tag_warnings("spring") == []
    assert len(tag_warnings("Spring")) == 1
    assert len(tag_warnings("a" * 21)) == 1


@pytest.mark.parametrize(
    ("age", "interval"),
    [
        (timedelta(minutes=0), 1),
        (timedelta(minutes=14), 1),
        (timedelta(minutes=15), 5),
        (timedelta(hours=3), 15),
        (timedelta(hours=13), 60),
        (timedelta(hours=47), 60),
    ],
)
def test_cadence_by_age(age: timedelta, interval: int) -> None:
    now = T0 + age
    due = next_poll_at(
        sent_at=T0, window_ends_at=T0 + timedelta(hours=48), now=now, cadence=CADENCE
    )
    assert due - now == timedelta(minutes=interval)


def test_last_poll_is_pinned_to_the_window_end() -> None:
    now = T0 + timedelta(hours=47, minutes=30)
    end = T0 + timedelta(hours=48)
    assert next_poll_at(sent_at=T0, window_ends_at=end, now=now, cadence=CADENCE) == end


def test_failure_backoff_doubles_but_never_exceeds_the_cadence() -> None:
    now = T0 + timedelta(hours=3)  # cadence 15 min
    waits = [
        next_poll_at(
            sent_at=T0,
            window_ends_at=T0 + timedelta(hours=48),
            now=now,
            cadence=CADENCE,
            consecutive_failures=n,
        )
        - now
        for n in range(1, 8)
    ]
    assert waits[:3] == [timedelta(seconds=30), timedelta(seconds=60), timedelta(seconds=120)]
    assert max(waits) == timedelta(minutes=15)


@pytest.mark.parametrize("spec", ["", "15m", "15m=0m", "2h=5m,15m=1m", "15x=1m", "15m=1m,,"])
def test_bad_cadence_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_cadence(spec)


def test_completion_needs_numbers_none_pending_and_settling() -> None:
    settle = timedelta(minutes=10)
    assert is_complete(total=3, pending=0, sent_at=T0, now=T0 + settle, settle=settle)
    assert not is_complete(
        total=3, pending=0, sent_at=T0, now=T0 + timedelta(minutes=9), settle=settle
    )
    assert not is_complete(total=3, pending=1, sent_at=T0, now=T0 + settle, settle=settle)
    assert not is_complete(total=0, pending=0, sent_at=T0, now=T0 + settle, settle=settle)


def test_sent_at_is_iso_8601_and_leaves_room_for_any_report_window() -> None:
    assert parse_sent_at("2026-11-26T10:00:00+01:00") == T0
    assert parse_sent_at(" 2026-11-26 09:00 ") == T0  # no offset: UTC
    latest = parse_sent_at("9998-12-31T23:59:59Z")
    assert latest <= LATEST_SENT_AT
    assert latest + MAX_REPORT_WINDOW <= datetime.max.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("yesterday", "'yesterday' is not an ISO-8601 date-time"),
        ("", "'' is not an ISO-8601 date-time"),
        ("9999-01-01T00:00:00Z", "'9999-01-01T00:00:00Z' is too far in the future"),
        ("9999-12-31T23:00:00+01:00", "'9999-12-31T23:00:00+01:00' is too far in the future"),
        ("0001-01-01T00:00:00+01:00", "'0001-01-01T00:00:00+01:00' is outside the years 1"),
        ("9999-12-31T23:00:00-05:00", "'9999-12-31T23:00:00-05:00' is outside the years 1"),
        ("x" * 100, "'" + "x" * 40 + "…' is not"),
    ],
)
def test_a_bad_sent_at_is_a_value_error_quoting_it(text: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_sent_at(text)
    assert str(caught.value).startswith(words)


def test_a_duration_too_long_for_timedelta_is_a_value_error() -> None:
    assert parse_duration("90d") == timedelta(days=90)
    with pytest.raises(ValueError, match="too long a duration"):
        parse_duration("99999999999d")
