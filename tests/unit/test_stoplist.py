"""The account's STOP list, read without I/O: Paris times to UTC, the paging rule that
decides when an answer is whole, item tolerance, and when the daemon syncs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from daemon.status import AUTH_RETRY
from daemon.stoplist import StopListEnvelope, StopListPages, parse_created_at, sync_due

PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("created", "utc"),
    [
        # Winter: CET, UTC+1.
        ("2026-01-15 10:19:45", datetime(2026, 1, 15, 9, 19, 45, tzinfo=UTC)),
        # Summer: CEST, UTC+2.
        ("2015-07-20 10:19:45", datetime(2015, 7, 20, 8, 19, 45, tzinfo=UTC)),
        # The night summer time ends (25 Oct 2026, 03:00 CEST → 02:00 CET): 02:30 happens
        # twice; fold=0 reads the first, still summer time.
        ("2026-10-25 02:30:00", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        ("2026-10-25 03:30:00", datetime(2026, 10, 25, 2, 30, tzinfo=UTC)),
        # The night it begins (29 Mar 2026, 02:00 CET → 03:00 CEST): 02:30 never happens;
        # fold=0 reads it with the offset before the change, the instant 03:30 CEST.
        ("2026-03-29 02:30:00", datetime(2026, 3, 29, 1, 30, tzinfo=UTC)),
        ("2026-03-29 03:30:00", datetime(2026, 3, 29, 1, 30, tzinfo=UTC)),
        # Text with its own offset is read with it.
        ("2026-01-15T10:00:00+00:00", datetime(2026, 1, 15, 10, 0, tzinfo=UTC)),
        (" 2026-01-15 10:00:00 ", datetime(2026, 1, 15, 9, 0, tzinfo=UTC)),
    ],
)
def test_created_at_is_paris_local_time_read_as_utc(created: str, utc: datetime) -> None:
    assert parse_created_at(created, PARIS) == utc


@pytest.mark.parametrize("created", [None, 1437380385, "", "yesterday", "20150720", "2015-13-01"])
def test_an_unreadable_created_at_is_none(created: object) -> None:
    assert parse_created_at(created, PARIS) is None


def _page(data: list[Any] | None, nb_data: object = None) -> StopListEnvelope:
    body: dict[str, Any] = {"success": True, "code": 200}
    if nb_data is not None:
        body["nbData"] = nb_data
    if data is not None:
        body["data"] = data
    return StopListEnvelope.model_validate(body)


def _items(*phones: str) -> list[dict[str, Any]]:
    return [
        {"id": i, "phoneNumber": p, "createdAt": "2026-01-15 10:00:00"}
        for i, p in enumerate(phones)
    ]


def _pages(max_pages: int = 10) -> StopListPages:
    return StopListPages(zone=PARIS, max_pages=max_pages, now=NOW)


def test_pages_are_followed_until_nb_data_items_arrived() -> None:
    pages = _pages()
    assert pages.add_page(_page(_items("+1", "+2"), nb_data=5)) is True
    assert pages.add_page(_page(_items("+3", "+4"), nb_data=5)) is True
    assert pages.add_page(_page(_items("+5"), nb_data="5")) is False
    assert (pages.stop_reason, pages.complete, pages.pages) == ("all_listed", True, 3)
    assert sorted(pages.numbers) == ["+1", "+2", "+3", "+4", "+5"]


def test_one_page_holding_the_whole_list_costs_one_request() -> None:
    pages = _pages()
    assert pages.add_page(_page(_items("+1", "+2"), nb_data=2)) is False
    assert pages.complete


@pytest.mark.parametrize(
    ("second", "reason", "complete"),
    [
        # A server ignoring `page` over a list longer than one page: not whole.
        (_page(_items("+1", "+2"), nb_data=3), "no_new_numbers", False),
        # The pages ran out before nbData items came.
        (_page([], nb_data=3), "empty_page", False),
        # nbData moved: the list changed while we paged, a number may have been skipped.
        (_page(_items("+3"), nb_data=4), "list_changed", False),
        # A page of garbage is not "no more numbers".
        (_page([{"phoneNumber": None}], nb_data=3), "unreadable_page", False),
        (_page(None, nb_data=3), "unreadable_page", False),
    ],
)
def test_an_answer_not_proven_whole_is_not_complete(
    second: StopListEnvelope, reason: str, complete: bool
) -> None:
    pages = _pages()
    assert pages.add_page(_page(_items("+1", "+2"), nb_data=3)) is True
    assert pages.add_page(second) is False
    assert (pages.stop_reason, pages.complete) == (reason, complete)
    assert "nothing was changed" in pages.why_incomplete


def test_max_pages_truncates() -> None:
    pages = _pages(max_pages=2)
    assert pages.add_page(_page(_items("+1"), nb_data=3))
    assert not pages.add_page(_page(_items("+2"), nb_data=3))
    assert (pages.stop_reason, pages.complete) == ("max_pages", False)
    assert "SMSPARTNER_MAX_PAGES=2" in pages.why_incomplete


def test_without_nb_data_the_pages_alone_end_the_list() -> None:
    pages = _pages()
    assert pages.add_page(_page(_items("+1", "+2")))
    assert not pages.add_page(_page([]))
    assert (pages.stop_reason, pages.complete) == ("empty_page", True)
    # A server ignoring `page` and giving no count: its repeat ends a whole list.
    pages = _pages()
    assert pages.add_page(_page(_items("+1", "+2")))
    assert not pages.add_page(_page(_items("+1", "+2")))
    assert (pages.stop_reason, pages.complete) == ("no_new_numbers", True)


def test_malformed_items_are_skipped_one_by_one_and_others_kept() -> None:
    pages = _pages()
    data: list[Any] = [
        {"id": "19", "phoneNumber": " +33600000001 ", "createdAt": "2015-07-20 10:19:45"},
        {"id": 20, "phoneNumber": 33600000002, "createdAt": "not a date"},
        {"id": "x", "phoneNumber": "+33600000003", "createdAt": "1970-01-01 00:00:00"},
        {"id": 2**70, "phoneNumber": "+33600000004"},
        "not an object",
        {"id": 22, "phoneNumber": "+33 6\x1b[2J"},
        {"id": 23},
        {"id": 24, "phoneNumber": "+33600000001", "createdAt": "2015-07-20 10:19:45"},
    ]
    with capture_logs() as logs:
        assert not pages.add_page(_page(data, nb_data=len(data)))
    assert pages.complete and pages.skipped == 3
    assert pages.numbers["+33600000001"] == (
        "+33600000001",
        19,
        datetime(2015, 7, 20, 8, 19, 45, tzinfo=UTC),
    )
    assert pages.numbers["33600000002"] == ("33600000002", 20, None)
    assert pages.numbers["+33600000003"] == ("+33600000003", None, None)  # before 2000
    assert pages.numbers["+33600000004"].provider_id is None  # past BIGINT
    events = [e["event"] for e in logs]
    assert events.count("stop_list.item_skipped") == 3
    assert "stop_list.item_coerced" in events


def test_a_created_at_in_the_future_is_not_kept() -> None:
    pages = _pages()
    pages.add_page(_page([{"phoneNumber": "+1", "createdAt": "2026-12-10 00:00:00"}], 1))
    assert pages.numbers["+1"].listed_at is None


def test_the_daemon_syncs_every_interval_and_probes_a_rejected_key_sooner() -> None:
    hour = timedelta(hours=1)
    assert sync_due(None, None, now=NOW, interval=hour)
    assert not sync_due(None, None, now=NOW, interval=timedelta(0))  # 0 = never
    assert not sync_due(NOW - 59 * timedelta(minutes=1), "ok", now=NOW, interval=hour)
    assert sync_due(NOW - hour, "ok", now=NOW, interval=hour)
    # A failure waits for the next interval too, not a tight loop.
    assert not sync_due(NOW - timedelta(minutes=10), "transient_error", now=NOW, interval=hour)
    # A rejected key is probed as polling probes it.
    assert sync_due(NOW - AUTH_RETRY, "auth_error", now=NOW, interval=hour)
    assert not sync_due(NOW - AUTH_RETRY / 2, "auth_error", now=NOW, interval=hour)
    # A record from a replica whose clock is far ahead does not stop syncing for ever.
    assert sync_due(NOW + 2 * hour, "ok", now=NOW, interval=hour)


def test_an_nb_data_lower_than_the_items_received_cannot_end_the_list() -> None:
    """A count that lies low (as ``lying_total`` does) must not cut the list short, which
    would remove every number on the pages not fetched."""
    pages = _pages()
    assert pages.add_page(_page(_items("+1", "+2", "+3"), nb_data=1)) is True
    assert pages.add_page(_page(_items("+4", "+5"), nb_data=1)) is True
    assert pages.add_page(_page([], nb_data=1)) is False
    assert (pages.stop_reason, pages.complete, len(pages.numbers)) == ("empty_page", True, 5)
