"""The SMS Partner client against ``httpx.MockTransport``: no sockets, no real waiting."""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from structlog.testing import capture_logs

from daemon.errors import (
    ApiError,
    AuthError,
    ConfigError,
    NoMessagesError,
    PermanentApiError,
    PollAbandoned,
    RateLimitedError,
    TransientApiError,
)
from daemon.redaction import redact
from daemon.smspartner import FetchResult, SmsPartnerClient
from daemon.status import Status

KEY = "k&y=+/é"
BASE_URL = "https://api.example.test/v1"
Handler = Callable[[httpx.Request], httpx.Response]


class FakeClock:
    """A monotonic clock that only moves when the fake sleep is called."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


class Server:
    """Records requests and answers them with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    @property
    def pages(self) -> list[int]:
        return [int(r.url.params["page"]) for r in self.requests]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_client(
    handler: Handler, clock: FakeClock, **kwargs: Any
) -> tuple[SmsPartnerClient, Server]:
    server = Server(handler)
    http = httpx.Client(transport=httpx.MockTransport(server))
    options: dict[str, Any] = {"rate_limit_per_second": 0, "max_retries": 3}
    options.update(kwargs)
    client = SmsPartnerClient(
        http,
        api_key=options.pop("api_key", KEY),
        base_url=BASE_URL,
        sleep=clock.sleep,
        monotonic=clock.monotonic,
        **options,
    )
    return client, server


def item(phone: Any = "+33600000001", status: Any = "Delivered", **extra: Any) -> dict[str, Any]:
    return {"phoneNumber": phone, "status": status, "stopSMS": False, "date": "1517989111", **extra}


def numbers(start: int, count: int) -> list[dict[str, Any]]:
    return [item(f"+336{n:08d}") for n in range(start, start + count)]


def body(items: list[Any], **envelope: Any) -> dict[str, Any]:
    return {"success": True, "code": 200, "StatutResponse_List": items, **envelope}


def paged(pages: dict[int, dict[str, Any]]) -> Handler:
    """Serve ``pages`` by the ``page`` parameter; any other page is empty."""

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json=pages.get(page, body([])))

    return handler


def error_body(code: int, message: str) -> dict[str, Any]:
    return {"success": False, "code": code, "message": message}


def assert_no_key(text: str) -> None:
    for variant in (KEY, quote(KEY, safe=""), quote_plus(KEY, safe="")):
        assert variant not in text, text


# --- pagination ---------------------------------------------------------------------


def test_stops_on_empty_page(clock: FakeClock) -> None:
    client, server = make_client(paged({1: body(numbers(0, 2))}), clock)
    result = client.fetch_tag("t")
    assert result == FetchResult(
        reports=result.reports,
        pages=2,
        items=2,
        skipped=0,
        stop_reason="empty_page",
        numbers=2,
    )
    assert [r.phone_number for r in result.reports] == ["+33600000000", "+33600000001"]
    assert server.pages == [1, 2]


def test_items_reading_as_a_known_report_are_counted_but_not_reported(
    clock: FakeClock,
) -> None:
    first = [
        item("+331"),
        item("+332", "Waiting"),
        item("+333", stopSMS="1"),
        item("+334", date="garbled"),
    ]
    client, _ = make_client(paged({1: body(first)}), clock)
    known = {report.phone_number: report for report in client.fetch_tag("t").reports}

    later = [
        item("+331"),  # repeated verbatim
        item("+332", "Delivered"),  # changed
        item("+333", stopSMS=True),  # the same report, another spelling
        item("+334", date="garbled"),  # the same report: no date either way
        item("+335"),  # new
        item("+331", stopSMS=True),  # the same number again, now with STOP
    ]
    client, _ = make_client(paged({1: body(later)}), clock)
    result = client.fetch_tag("t", known)
    assert [r.phone_number for r in result.reports] == ["+332", "+335", "+331"]
    assert result.reports[2].stop_sms is True
    assert (result.numbers, result.items) == (5, 6)


def test_a_server_ignoring_page_still_stops_when_every_item_is_known(clock: FakeClock) -> None:
    answer = body(numbers(0, 3))  # no total, no currentPage, whatever the page
    client, server = make_client(lambda _: httpx.Response(200, json=answer), clock)
    known = {report.phone_number: report for report in client.fetch_tag("t").reports}
    client, server = make_client(lambda _: httpx.Response(200, json=answer), clock)
    result = client.fetch_tag("t", known)
    assert (result.reports, result.numbers, result.stop_reason) == ([], 3, "no_new_numbers")
    assert server.pages == [1, 2]


def test_a_short_page_ends_pagination(clock: FakeClock) -> None:
    pages = {1: body(numbers(0, 2), total=3), 2: body(numbers(2, 1), total="3")}
    client, server = make_client(paged(pages), clock)
    with capture_logs() as logs:
        result = client.fetch_tag("t")
    assert (result.stop_reason, result.pages, result.items) == ("short_page", 2, 3)
    assert server.pages == [1, 2]
    assert not [e for e in logs if e["event"] == "api.total_mismatch"]  # it agreed


def test_once_the_page_size_is_known_a_one_page_tag_costs_one_request(
    clock: FakeClock,
) -> None:
    tags = {
        "big": {1: body(numbers(0, 500)), 2: body(numbers(500, 100))},
        "small": {1: body(numbers(0, 5), total=5)},
        "no-total": {1: body(numbers(0, 7))},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        pages = tags[request.url.params["tag"]]
        return httpx.Response(200, json=pages.get(int(request.url.params["page"]), body([])))

    client, server = make_client(handler, clock)
    assert client.fetch_tag("big").stop_reason == "short_page"
    assert client.fetch_tag("small").stop_reason == "short_page"
    assert client.fetch_tag("no-total").stop_reason == "short_page"
    assert [(r.url.params["tag"], r.url.params["page"]) for r in server.requests] == [
        ("big", "1"),
        ("big", "2"),
        ("small", "1"),
        ("no-total", "1"),
    ]


def test_total_keeps_a_fetch_going_but_never_ends_it(clock: FakeClock) -> None:
    """Pages of 50 after pages of 500 look short; a total of 120 says more are coming."""
    tags = {
        "big": {1: body(numbers(0, 500))},
        "fifties": {n: body(numbers(n * 50, 50 if n < 3 else 20), total=120) for n in (1, 2, 3)},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        pages = tags[request.url.params["tag"]]
        return httpx.Response(200, json=pages.get(int(request.url.params["page"]), body([])))

    client, _ = make_client(handler, clock)
    client.fetch_tag("big")
    result = client.fetch_tag("fifties")
    assert (result.stop_reason, result.pages, result.items) == ("short_page", 3, 120)


@pytest.mark.parametrize("total", [1, 0, "2", 10_000])
def test_a_lying_total_never_truncates_a_tag(clock: FakeClock, total: int | str) -> None:
    """3,000 numbers under ``total: 1``: every page is fetched and the lie is reported."""
    pages = {n: body(numbers((n - 1) * 1000, 1000), total=total) for n in (1, 2, 3)}
    mismatches: list[int] = []
    client, server = make_client(
        paged(pages), clock, on_total_mismatch=lambda: mismatches.append(1)
    )
    with capture_logs() as logs:
        result = client.fetch_tag("t")
    assert len({r.phone_number for r in result.reports}) == 3000
    assert (result.stop_reason, server.pages) == ("empty_page", [1, 2, 3, 4])
    [warning] = [e for e in logs if e["event"] == "api.total_mismatch"]
    assert (warning["log_level"], warning["total"], warning["items"]) == (
        "warning",
        int(total),
        3000,
    )
    assert mismatches == [1]


def test_a_lying_current_page_neither_stops_nor_discards(clock: FakeClock) -> None:
    pages = {
        1: body(numbers(0, 2), currentPage=1),
        2: body(numbers(5, 2), currentPage="1"),  # right content, wrong claim
    }
    client, server = make_client(paged(pages), clock)
    result = client.fetch_tag("t")
    assert result.stop_reason == "empty_page"
    assert (result.pages, result.items, len(result.reports)) == (3, 4, 4)
    assert server.pages == [1, 2, 3]


@pytest.mark.parametrize("total", [None, "abc", "", [1], True])
def test_missing_or_unparsable_total_disables_the_total_rule(
    clock: FakeClock, total: object
) -> None:
    envelope = {} if total is None else {"total": total}
    pages = {1: body(numbers(0, 1), **envelope), 2: body(numbers(1, 1), **envelope)}
    client, server = make_client(paged(pages), clock)
    result = client.fetch_tag("t")
    assert result.stop_reason == "empty_page"
    assert server.pages == [1, 2, 3]


def test_current_page_as_numeric_string_matching_is_fine(clock: FakeClock) -> None:
    pages = {1: body(numbers(0, 1), currentPage="1"), 2: body(numbers(1, 1), currentPage="2")}
    client, _ = make_client(paged(pages), clock)
    assert client.fetch_tag("t").stop_reason == "empty_page"


def test_no_new_numbers_keeps_the_page_then_stops(clock: FakeClock) -> None:
    pages = {
        1: body([item("+33600000001", "Waiting"), item("+33600000002", "Waiting")]),
        2: body([item("+33600000002", "Delivered")]),
        3: body(numbers(10, 5)),  # never asked for
    }
    client, server = make_client(paged(pages), clock)
    result = client.fetch_tag("t")
    assert result.stop_reason == "no_new_numbers"
    assert [r.status for r in result.reports] == [Status.WAITING, Status.WAITING, Status.DELIVERED]
    assert (result.pages, result.items) == (2, 3)
    assert server.pages == [1, 2]


def test_stops_at_max_pages(clock: FakeClock) -> None:
    def endless(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json=body(numbers(page * 10, 10)))

    client, server = make_client(endless, clock, max_pages=3)
    with capture_logs() as logs:
        result = client.fetch_tag("t")
    assert (result.stop_reason, result.pages, result.items) == ("max_pages", 3, 30)
    assert server.pages == [1, 2, 3]
    stopped = [e for e in logs if e["event"] == "api.pagination_stopped"]
    assert stopped[0]["reason"] == "max_pages"
    assert stopped[0]["log_level"] == "warning"


def test_duplicates_across_pages_are_kept_and_counted(clock: FakeClock) -> None:
    pages = {
        1: body([item("+33600000001"), item("+33600000002")]),
        2: body([item("+33600000002", "Not delivered"), item("+33600000003")]),
    }
    client, _ = make_client(paged(pages), clock)
    result = client.fetch_tag("t")
    assert [r.phone_number for r in result.reports] == [
        "+33600000001",
        "+33600000002",
        "+33600000002",
        "+33600000003",
    ]
    assert result.items == 4


def test_1234_items_over_three_pages_of_500(clock: FakeClock) -> None:
    pages = {
        1: body(numbers(0, 500), currentPage=1, total=1234),
        2: body(numbers(500, 500), currentPage=2, total=1234),
        3: body(numbers(1000, 234), currentPage=3, total=1234),
    }
    client, server = make_client(paged(pages), clock)
    result = client.fetch_tag("t")
    assert (result.stop_reason, result.pages, result.items) == ("short_page", 3, 1234)
    assert len({r.phone_number for r in result.reports}) == 1234
    assert server.pages == [1, 2, 3]


@pytest.mark.parametrize(
    "envelope",
    [{}, {"currentPage": 1}, {"total": 10_000}, {"currentPage": 1, "total": 10_000}],
)
def test_server_ignoring_page_stops_within_three_requests(
    clock: FakeClock, envelope: dict[str, Any]
) -> None:
    def same_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=body(numbers(0, 50), **envelope))

    client, server = make_client(same_page, clock)
    result = client.fetch_tag("t")
    assert len(server.requests) <= 3
    assert result.stop_reason == "no_new_numbers"
    assert len({r.phone_number for r in result.reports}) == 50


def test_missing_list_is_an_empty_page(clock: FakeClock) -> None:
    client, _ = make_client(lambda r: httpx.Response(200, json={"success": True}), clock)
    result = client.fetch_tag("t")
    assert (result.stop_reason, result.reports, result.pages) == ("empty_page", [], 1)


# --- provider errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "code", "message"),
    [
        (200, 10, "Incorrect API Key"),
        (401, 10, "Incorrect API Key"),
        (200, 1, "API key required"),
        (400, 1, "API key required"),
    ],
)
def test_auth_codes_raise_auth_error_without_retry(
    clock: FakeClock, http_status: int, code: int, message: str
) -> None:
    client, server = make_client(
        lambda r: httpx.Response(http_status, json=error_body(code, message)), clock
    )
    with pytest.raises(AuthError) as caught:
        client.fetch_tag("t")
    assert str(caught.value) == f"SMS Partner rejected the API key (code {code}: {message})"
    assert (caught.value.code, caught.value.http_status) == (code, http_status)
    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_auth_error_redacts_a_key_echoed_by_the_provider(clock: FakeClock) -> None:
    echo = error_body(10, f"Incorrect API Key {KEY}")
    client, _ = make_client(lambda r: httpx.Response(200, json=echo), clock)
    with pytest.raises(AuthError) as caught:
        client.fetch_tag("t")
    assert_no_key(str(caught.value))
    assert "***" in str(caught.value)


@pytest.mark.parametrize("http_status", [200, 404])
def test_code_4_on_first_page_is_no_messages(clock: FakeClock, http_status: int) -> None:
    client, server = make_client(
        lambda r: httpx.Response(http_status, json=error_body(4, "Message not found")), clock
    )
    with pytest.raises(NoMessagesError) as caught:
        client.fetch_tag("t")
    assert caught.value.code == 4
    assert not caught.value.transient
    assert len(server.requests) == 1


def test_code_4_on_a_later_page_ends_pagination(clock: FakeClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["page"] == "1":
            return httpx.Response(200, json=body(numbers(0, 3)))
        return httpx.Response(200, json=error_body(4, "Message not found"))

    client, server = make_client(handler, clock)
    result = client.fetch_tag("t")
    assert (result.stop_reason, result.items, len(result.reports)) == ("empty_page", 3, 3)
    assert server.pages == [1, 2]


def test_http_429_honours_retry_after_seconds_exactly(clock: FakeClock) -> None:
    answers = iter(
        [httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(200, json=body([]))]
    )
    client, server = make_client(lambda r: next(answers), clock)
    with capture_logs() as logs:
        result = client.fetch_tag("t")
    assert result.stop_reason == "empty_page"
    assert clock.sleeps == [7.0]
    events = [e["event"] for e in logs]
    assert "api.rate_limited" in events
    retry = next(e for e in logs if e["event"] == "api.retry_scheduled")
    assert (retry["attempt"], retry["wait"], retry["log_level"]) == (1, 7.0, "warning")
    assert len(server.requests) == 2


def test_retry_after_http_date_and_cap(clock: FakeClock) -> None:
    date = "Wed, 21 Oct 2026 07:28:00 GMT"
    answers = iter(
        [
            httpx.Response(
                429, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:12 GMT", "Date": date}
            ),
            httpx.Response(429, headers={"Retry-After": "3600"}),
            httpx.Response(200, json=body([])),
        ]
    )
    client, _ = make_client(lambda r: next(answers), clock)
    client.fetch_tag("t")
    assert clock.sleeps == [12.0, 300.0]


def test_json_code_429_is_rate_limited_and_retried(clock: FakeClock) -> None:
    answers = iter(
        [
            httpx.Response(200, json=error_body(429, "Too many requests")),
            httpx.Response(200, json=body(numbers(0, 1))),
            httpx.Response(200, json=body([])),
        ]
    )
    client, server = make_client(lambda r: next(answers), clock, retry_backoff=2.0)
    result = client.fetch_tag("t")
    assert len(result.reports) == 1
    assert len(clock.sleeps) == 1
    assert 0 <= clock.sleeps[0] <= 2.0
    assert server.pages == [1, 1, 2]


def test_json_code_429_exhausted_is_rate_limited_error(clock: FakeClock) -> None:
    client, _ = make_client(
        lambda r: httpx.Response(200, json=error_body(429, "slow down")), clock, max_retries=1
    )
    with pytest.raises(RateLimitedError) as caught:
        client.fetch_tag("t")
    assert caught.value.code == 429
    assert caught.value.transient


def test_500_is_retried_then_succeeds(clock: FakeClock) -> None:
    answers = iter(
        [
            httpx.Response(500, text="oops"),
            httpx.Response(503),
            httpx.Response(200, json=body(numbers(0, 1))),
            httpx.Response(200, json=body([])),
        ]
    )
    client, server = make_client(lambda r: next(answers), clock, retry_backoff=1.0)
    result = client.fetch_tag("t")
    assert len(result.reports) == 1
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] <= 1.0
    assert 0 <= clock.sleeps[1] <= 2.0
    assert server.pages == [1, 1, 1, 2]


@pytest.mark.parametrize(
    "content",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"success": true, "code": 200, "StatutResponse_Li',
        b"",
        b"[1, 2, 3]",
        b"\xff\xfe garbage",
        b'{"success": true, "StatutResponse_List": "nope"}',
    ],
    ids=["html", "truncated", "empty", "list", "not-utf8", "list-not-a-list"],
)
def test_unreadable_bodies_are_transient(clock: FakeClock, content: bytes) -> None:
    client, server = make_client(lambda r: httpx.Response(200, content=content), clock)
    with pytest.raises(TransientApiError) as caught:
        client.fetch_tag("t")
    assert type(caught.value) is TransientApiError
    assert len(server.requests) == 4
    assert "gave up after 4 attempts" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ('\ufeff{"success": true, "code": 200, "StatutResponse_List": [ITEM]}', "utf-8"),
        ('{"success": true, "code": 200, "total": NaN, "StatutResponse_List": [ITEM]}', "utf-8"),
        ('{"success": true, "total": 1e999999, "StatutResponse_List": [ITEM]}', "utf-8"),
        ('{"success": true, "message": "\\ud800", "StatutResponse_List": [ITEM]}', "utf-8"),
        ('{"success": true, "code": 200, "StatutResponse_List": [ITEM]}', "utf-16"),
    ],
    ids=["utf8-bom", "nan", "infinity", "lone-surrogate", "utf16"],
)
def test_bodies_only_the_lenient_json_parser_reads_are_still_read(
    clock: FakeClock, text: str, encoding: str
) -> None:
    """Pages go through orjson first; what it is stricter about than json still parses."""
    content = text.replace("ITEM", json.dumps(item("+33600000009"))).encode(encoding)
    client, server = make_client(
        lambda r: httpx.Response(200, content=content if r.url.params["page"] == "1" else b"{}"),
        clock,
    )
    result = client.fetch_tag("t")
    assert [r.phone_number for r in result.reports] == ["+33600000009"]
    assert result.reports[0].status is Status.DELIVERED
    assert server.pages.count(1) == 1  # read at the first attempt, not retried


def test_unreadable_body_then_good_body(clock: FakeClock) -> None:
    answers = iter(
        [
            httpx.Response(200, content=b"<html>maintenance</html>"),
            httpx.Response(200, json=body([])),
        ]
    )
    client, _ = make_client(lambda r: next(answers), clock)
    assert client.fetch_tag("t").stop_reason == "empty_page"


def test_retries_exhausted_counts_attempts_and_logs_each_retry(clock: FakeClock) -> None:
    client, server = make_client(
        lambda r: httpx.Response(502), clock, max_retries=2, retry_backoff=0.5
    )
    with capture_logs() as logs, pytest.raises(TransientApiError) as caught:
        client.fetch_tag("t")
    assert len(server.requests) == 3
    assert "gave up after 3 attempts" in str(caught.value)
    assert caught.value.http_status == 502
    retries = [e for e in logs if e["event"] == "api.retry_scheduled"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert [e["wait"] for e in retries] == pytest.approx(clock.sleeps, abs=1e-3)
    assert all(0 <= w <= 0.5 * 2**n for n, w in enumerate(clock.sleeps))


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(403, text="Forbidden"),
        httpx.Response(404, text="<html>Not Found</html>"),
        httpx.Response(200, json=error_body(3, "message id required")),
        httpx.Response(400, json=error_body(99, "bad thing")),
        httpx.Response(400, json={"error": "whatever"}),
    ],
    ids=["403", "404-html", "code-3", "code-99-http-400", "400-json-no-code"],
)
def test_permanent_errors_are_not_retried(clock: FakeClock, response: httpx.Response) -> None:
    client, server = make_client(lambda r: response, clock)
    with pytest.raises(PermanentApiError):
        client.fetch_tag("t")
    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_transport_errors_are_transient_and_chained(clock: FakeClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client, server = make_client(handler, clock, max_retries=1)
    with pytest.raises(TransientApiError) as caught:
        client.fetch_tag("t")
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    assert "ReadTimeout" in str(caught.value)
    assert len(server.requests) == 2


# --- items ----------------------------------------------------------------------------


def fetch_items(
    clock: FakeClock, items: list[Any]
) -> tuple[FetchResult, list[MutableMapping[str, Any]]]:
    client, _ = make_client(paged({1: body(items)}), clock)
    with capture_logs() as logs:
        result = client.fetch_tag("t")
    return result, logs


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"status": "Delivered"}, "phoneNumber"),
        ({"phoneNumber": None, "status": "Delivered"}, "phoneNumber"),
        ({"phoneNumber": "   ", "status": "Delivered"}, "phoneNumber"),
        ({"phoneNumber": ["+33"], "status": "Delivered"}, "phoneNumber"),
        ({"phoneNumber": "+33600000009"}, "status"),
        ({"phoneNumber": "+33600000009", "status": 3}, "status"),
        ("not a dict", "item"),
        (None, "item"),
    ],
)
def test_one_malformed_item_is_skipped_not_the_page(clock: FakeClock, bad: Any, field: str) -> None:
    result, logs = fetch_items(clock, [item("+33600000001"), bad, item("+33600000002")])
    assert [r.phone_number for r in result.reports] == ["+33600000001", "+33600000002"]
    assert (result.items, result.skipped) == (3, 1)
    [skipped] = [e for e in logs if e["event"] == "api.item_skipped"]
    assert (skipped["field"], skipped["index"], skipped["log_level"]) == (field, 1, "warning")


def test_int_phone_number_is_coerced_and_strings_stripped(clock: FakeClock) -> None:
    result, _ = fetch_items(clock, [item(33600000001), item("  +33600000002 ")])
    assert [r.phone_number for r in result.reports] == ["33600000001", "+33600000002"]
    assert result.skipped == 0


@pytest.mark.parametrize(
    ("raw", "expected", "warned"),
    [
        (True, True, False),
        (False, False, False),
        ("1", True, False),
        ("0", False, False),
        (1, True, False),
        (0, False, False),
        ("true", True, False),
        ("FALSE", False, False),
        (None, False, False),
        ("yes", False, True),
        (2, False, True),
        ({}, False, True),
    ],
)
def test_stop_sms_coercion(clock: FakeClock, raw: Any, expected: bool, warned: bool) -> None:
    result, logs = fetch_items(clock, [item(stopSMS=raw)])
    assert result.reports[0].stop_sms is expected
    assert result.skipped == 0
    warnings = [e for e in logs if e["event"] == "api.item_coerced"]
    assert [e["field"] for e in warnings] == (["stopSMS"] if warned else [])


def test_missing_stop_sms_is_false(clock: FakeClock) -> None:
    result, _ = fetch_items(clock, [{"phoneNumber": "+33600000001", "status": "Waiting"}])
    assert result.reports[0].stop_sms is False
    assert result.reports[0].reported_at is None


@pytest.mark.parametrize("raw", ["yesterday", "-5", [1], "99999999999999"])
def test_garbage_date_keeps_the_report_without_date(clock: FakeClock, raw: Any) -> None:
    result, logs = fetch_items(clock, [item(date=raw)])
    assert result.reports[0].reported_at is None
    assert result.skipped == 0
    assert [e["field"] for e in logs if e["event"] == "api.item_coerced"] == ["date"]


def test_status_mapping_keeps_the_raw_text(clock: FakeClock) -> None:
    result, _ = fetch_items(
        clock,
        [
            item("+1", " Not delivered "),
            item("+2", "ko"),
            item("+3", "Something new"),
            item("+4", date=1517989111),
        ],
    )
    assert [(r.status, r.provider_status) for r in result.reports] == [
        (Status.NOT_DELIVERED, " Not delivered "),
        (Status.FAILED, "ko"),
        (Status.UNKNOWN, "Something new"),
        (Status.DELIVERED, "Delivered"),
    ]
    assert result.reports[3].reported_at == datetime.fromtimestamp(1517989111, tz=UTC)


def test_item_warnings_are_capped_per_fetch(clock: FakeClock) -> None:
    result, logs = fetch_items(clock, [item("+1"), *([{"status": "x"}] * 50)])
    assert result.skipped == 50
    warnings = [e for e in logs if e["event"] == "api.item_skipped"]
    assert len(warnings) == 20
    assert "suppressed" in warnings[-1]["note"]


# --- request shape and secrets -------------------------------------------------------


def test_key_and_tag_arrive_url_encoded_and_intact(clock: FakeClock) -> None:
    client, server = make_client(paged({}), clock)
    client.fetch_tag("tag#1?x")
    [request] = server.requests
    assert request.method == "GET"
    assert request.url.path == "/v1/bulk-status-by-tag"
    assert dict(request.url.params) == {"apiKey": KEY, "tag": "tag#1?x", "page": "1"}
    assert request.headers["User-Agent"].startswith("smspartner-status/")


def test_key_never_leaks_from_transport_errors(clock: FakeClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url} ({KEY})", request=request)

    client, _ = make_client(handler, clock, max_retries=2)
    with capture_logs() as logs, pytest.raises(TransientApiError) as caught:
        client.fetch_tag("tag#1?x")
    error = caught.value
    formatted = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), formatted, repr(logs), repr(client)):
        assert_no_key(text)
    assert "apiKey=***" in formatted  # the chained httpx message was redacted, not lost
    assert any(e["event"] == "api.retry_scheduled" for e in logs)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, text=f"error for apiKey={KEY}"),
        httpx.Response(404, text=f"<html>no route for ?apiKey={quote_plus(KEY)}</html>"),
        httpx.Response(200, text=f"<html>{KEY}</html>"),
        httpx.Response(429, json=error_body(429, KEY)),
        httpx.Response(200, json=error_body(77, f"bad key {KEY}")),
    ],
)
def test_key_never_leaks_from_errors_or_logs(clock: FakeClock, response: httpx.Response) -> None:
    client, _ = make_client(lambda r: response, clock, max_retries=1)
    with capture_logs() as logs, pytest.raises(ApiError) as caught:
        client.fetch_tag("t")
    formatted = "".join(traceback.format_exception(caught.value))
    for text in (str(caught.value), repr(caught.value), formatted, repr(logs)):
        assert_no_key(text)


def test_key_cut_by_the_excerpt_limit_is_still_hidden(clock: FakeClock) -> None:
    secret = "S3CRET-0123456789-abcdef"
    page = "x" * 110 + secret + " tail"
    client, _ = make_client(
        lambda r: httpx.Response(200, text=page), clock, api_key=secret, max_retries=0
    )
    with pytest.raises(TransientApiError) as caught:
        client.fetch_tag("t")
    assert "S3CRET" not in str(caught.value)


@pytest.mark.parametrize("base_url", ["ftp://host/v1", "not a url", "http://[::1/v1"])
def test_bad_base_url_is_a_config_error(base_url: str) -> None:
    http = httpx.Client(transport=httpx.MockTransport(paged({})))
    with pytest.raises(ConfigError, match="base URL"):
        SmsPartnerClient(http, api_key=KEY, base_url=base_url)
    http.close()


def test_redact() -> None:
    url = f"https://h/v1/x?apiKey={quote_plus(KEY, safe='')}&tag=t"
    assert redact(url) == "https://h/v1/x?apiKey=***&tag=t"
    assert redact("GET '/x?APIKEY=abc' done") == "GET '/x?APIKEY=***' done"
    assert redact(f"key {KEY} or {quote(KEY, safe='')} here", KEY) == "key *** or *** here"
    assert redact("nothing to hide", "") == "nothing to hide"
    assert redact("nothing to hide", None) == "nothing to hide"


def test_close_leaves_the_injected_client_open() -> None:
    http = httpx.Client(transport=httpx.MockTransport(paged({})))
    client = SmsPartnerClient(http, api_key=KEY, base_url=BASE_URL, rate_limit_per_second=0)
    client.close()
    assert not http.is_closed
    assert client.fetch_tag("t").stop_reason == "empty_page"
    http.close()


@pytest.mark.usefixtures("debug_logs")
def test_debug_events_name_tag_page_and_reason(clock: FakeClock) -> None:
    client, _ = make_client(paged({1: body(numbers(0, 1))}), clock)
    with capture_logs() as logs:
        client.fetch_tag("t")
    requests = [e for e in logs if e["event"] == "api.request"]
    assert [(e["tag"], e["page"], e["status"]) for e in requests] == [("t", 1, 200), ("t", 2, 200)]
    assert all(e["log_level"] == "debug" and e["elapsed_ms"] >= 0 for e in requests)
    [stopped] = [e for e in logs if e["event"] == "api.pagination_stopped"]
    assert (stopped["reason"], stopped["log_level"]) == ("empty_page", "debug")


# --- rate limit -----------------------------------------------------------------------


def test_token_bucket_spaces_requests(clock: FakeClock) -> None:
    def endless(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json=body(numbers(page * 10, 10)))

    client, server = make_client(endless, clock, rate_limit_per_second=4, max_pages=5)
    client.fetch_tag("t")
    assert len(server.requests) == 5
    assert clock.sleeps == [0.25] * 4  # the first request is free, then 1/4 s apart
    assert clock.now == pytest.approx(1001.0)


def test_token_bucket_shared_by_threads(clock: FakeClock) -> None:
    # The clock never moves here (nobody advances it), so every waiting thread must have
    # reserved its own slot: 0.5 s, 1.0 s, 1.5 s after the first free request.
    frozen = FakeClock()
    waits: list[float] = []
    lock = threading.Lock()

    def record(seconds: float) -> None:
        with lock:
            waits.append(seconds)

    server = Server(paged({}))
    client = SmsPartnerClient(
        httpx.Client(transport=httpx.MockTransport(server)),
        api_key=KEY,
        base_url=BASE_URL,
        rate_limit_per_second=2,
        sleep=record,
        monotonic=frozen.monotonic,
    )
    threads = [threading.Thread(target=client.fetch_tag, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(server.requests) == 4
    assert sorted(waits) == [0.5, 1.0, 1.5]


def test_rate_limit_off_never_sleeps(clock: FakeClock) -> None:
    client, server = make_client(paged({1: body(numbers(0, 1))}), clock, rate_limit_per_second=0)
    client.fetch_tag("t")
    assert len(server.requests) == 2
    assert clock.sleeps == []


# --- the shutdown deadline -----------------------------------------------------------


class Deadline:
    """What the daemon gives the client: None until shutdown, then a monotonic time."""

    def __init__(self, at: float | None = None) -> None:
        self.at = at

    def __call__(self) -> float | None:
        return self.at


def timed_pages(clock: FakeClock, seconds: float, on_page: Callable[[int], None]) -> Handler:
    """An endless tag whose every request takes ``seconds`` of the fake clock."""

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        on_page(page)
        clock.now += seconds
        return httpx.Response(200, json=body(numbers(page * 10, 10)))

    return handler


def test_deadline_abandons_a_long_fetch_between_pages_with_the_rate_limit_off(
    clock: FakeClock,
) -> None:
    deadline = Deadline()

    def shutdown_during_page_3(page: int) -> None:
        if page == 3:
            deadline.at = clock.now + 2.5  # SIGTERM while page 3 is being fetched

    client, server = make_client(
        timed_pages(clock, 1.0, shutdown_during_page_3),
        clock,
        rate_limit_per_second=0,
        max_pages=1000,
        deadline=deadline,
    )
    with pytest.raises(PollAbandoned) as caught:
        client.fetch_tag("t")
    # Page 4 still ends before the deadline; page 5, under way at it, is cut short.
    assert server.pages == [1, 2, 3, 4, 5]
    assert caught.value.pages == 4
    assert "under way at its shutdown deadline was cut short" in str(caught.value)
    assert not isinstance(caught.value, ApiError)  # not a provider failure
    assert clock.sleeps == []


def test_rate_limited_pages_go_on_as_usual_before_the_deadline(clock: FakeClock) -> None:
    def eight_numbers(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        return httpx.Response(200, json=body(numbers(page, 1) if page <= 8 else [], total=8))

    client, server = make_client(
        eight_numbers, clock, rate_limit_per_second=4, deadline=Deadline(clock.now + 8)
    )
    result = client.fetch_tag("t")
    assert (result.pages, result.stop_reason, len(result.reports)) == (9, "empty_page", 8)
    assert server.pages == list(range(1, 10))
    assert clock.sleeps == [0.25] * 8


def test_a_rate_limit_wait_past_the_deadline_abandons(clock: FakeClock) -> None:
    client, server = make_client(
        timed_pages(clock, 0.0, lambda page: None),
        clock,
        rate_limit_per_second=0.5,  # one request every 2 s
        deadline=Deadline(clock.now + 5),
    )
    with pytest.raises(PollAbandoned) as caught:
        client.fetch_tag("t")
    assert server.pages == [1, 2, 3]  # at +0, +2 and +4 s; +6 s is too late
    assert caught.value.pages == 3
    assert clock.sleeps == [2.0, 2.0]


def test_a_retry_that_would_come_past_the_deadline_is_not_scheduled(clock: FakeClock) -> None:
    client, server = make_client(
        lambda r: httpx.Response(429, headers={"Retry-After": "30"}),
        clock,
        deadline=Deadline(clock.now + 8),
    )
    with capture_logs() as logs, pytest.raises(PollAbandoned) as caught:
        client.fetch_tag("t")
    assert len(server.requests) == 1 and caught.value.pages == 0
    assert "a retry in 30.0 s would come after its shutdown deadline" in str(caught.value)
    assert clock.sleeps == []
    assert not [e for e in logs if e["event"] == "api.retry_scheduled"]


def test_a_retry_that_would_not_fit_in_the_poll_budget_fails_the_poll(clock: FakeClock) -> None:
    client, server = make_client(
        lambda r: httpx.Response(429, headers={"Retry-After": "30"}), clock, poll_budget=20
    )
    with capture_logs() as logs, pytest.raises(TransientApiError) as caught:
        client.fetch_tag("t")
    assert len(server.requests) == 1 and clock.sleeps == []
    assert "no retry: the poll's budget of 20 s is spent" in str(caught.value)
    assert "rate limited by SMS Partner" in str(caught.value)  # the last error, kept
    assert not [e for e in logs if e["event"] == "api.retry_scheduled"]


def test_pages_stop_when_the_poll_budget_is_spent(clock: FakeClock) -> None:
    client, server = make_client(
        timed_pages(clock, 4.0, lambda page: None), clock, poll_budget=10, max_pages=1000
    )
    with pytest.raises(TransientApiError) as caught:
        client.fetch_tag("t")
    assert server.pages == [1, 2, 3]  # at +0, +4 and +8 s; the third would end at +12 s
    assert str(caught.value) == (
        "GET /v1/bulk-status-by-tag tag='t' page=3: the poll's budget of 10 s was spent mid-request"
    )


def test_the_default_poll_budget_fits_the_largest_fetch_allowed() -> None:
    from daemon.smspartner import default_poll_budget

    small = default_poll_budget(
        request_timeout=10, max_retries=3, max_pages=1000, rate_limit_per_second=5
    )
    assert small == 300 + 4 * 10  # never under five minutes
    slow = default_poll_budget(
        request_timeout=10, max_retries=3, max_pages=1000, rate_limit_per_second=1
    )
    assert slow == 1000 + 4 * 10  # 1,000 pages at one a second, plus one page's attempts


def test_a_retry_before_the_deadline_still_happens(clock: FakeClock) -> None:
    answers = iter(
        [httpx.Response(429, headers={"Retry-After": "3"}), httpx.Response(200, json=body([]))]
    )
    client, server = make_client(lambda r: next(answers), clock, deadline=Deadline(clock.now + 8))
    with capture_logs() as logs:
        assert client.fetch_tag("t").stop_reason == "empty_page"
    assert clock.sleeps == [3.0] and len(server.requests) == 2
    assert [e["event"] for e in logs].count("api.retry_scheduled") == 1


@pytest.mark.parametrize(
    ("retry_after", "abandoned"), [(30.0, True), (5.0, False)], ids=["too-long", "fits"]
)
def test_a_wait_cut_short_by_shutdown_is_decided_again(
    clock: FakeClock, retry_after: float, abandoned: bool
) -> None:
    """The daemon's sleep returns as soon as shutdown begins; the client then knows the
    deadline, gives up a wait that would end after it and finishes one that would not."""
    deadline = Deadline()
    slept: list[float] = []

    def daemon_sleep(seconds: float) -> None:
        slept.append(seconds)
        if deadline.at is None:  # SIGTERM 1 s into the wait
            clock.now += 1.0
            deadline.at = clock.now + 8
        else:
            clock.sleep(seconds)

    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": f"{retry_after:g}"}),
            httpx.Response(200, json=body([])),
        ]
    )
    server = Server(lambda r: next(answers))
    client = SmsPartnerClient(
        httpx.Client(transport=httpx.MockTransport(server)),
        api_key=KEY,
        base_url=BASE_URL,
        rate_limit_per_second=0,
        sleep=daemon_sleep,
        monotonic=clock.monotonic,
        deadline=deadline,
    )
    if abandoned:
        with pytest.raises(PollAbandoned):
            client.fetch_tag("t")
        assert (slept, len(server.requests)) == ([30.0], 1)
    else:
        assert client.fetch_tag("t").stop_reason == "empty_page"
        assert (slept, len(server.requests)) == ([5.0, 4.0], 2)  # the rest of the wait


def test_error_bodies_are_json_serialisable_in_logs(clock: FakeClock) -> None:
    # Log events must stay plain data so the JSON renderer never chokes on them.
    client, _ = make_client(lambda r: httpx.Response(503), clock, max_retries=1)
    with capture_logs() as logs, pytest.raises(TransientApiError):
        client.fetch_tag("t")
    json.dumps(logs)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_huge_body_is_refused_without_reading_it_all(declared: bool) -> None:
    from daemon.smspartner import MAX_BODY_BYTES

    chunk = b"x" * (1024 * 1024)
    sent = []

    def body() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // len(chunk) + 20):
            sent.append(1)
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Length": str(50 * 1024 * 1024)} if declared else {}
        return httpx.Response(200, headers=headers, content=body())

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = SmsPartnerClient(
            http,
            api_key="k-123456",
            base_url="http://sms.test/v1",
            max_retries=0,
            rate_limit_per_second=0,
            sleep=lambda _: None,
        )
        with pytest.raises(PermanentApiError, match="byte limit"):
            client.fetch_tag("huge")
    assert len(sent) <= MAX_BODY_BYTES // len(chunk) + 1


def test_gzip_bodies_still_parse() -> None:
    import gzip
    import json as _json

    payload = _json.dumps(
        {
            "success": True,
            "code": 200,
            "currentPage": 1,
            "total": 1,
            "StatutResponse_List": [
                {"phoneNumber": "+331", "status": "Delivered", "stopSMS": False, "date": "1"}
            ],
        }
    ).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, content=gzip.compress(payload)
        )

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = SmsPartnerClient(
            http,
            api_key="k-123456",
            base_url="http://sms.test/v1",
            rate_limit_per_second=0,
            sleep=lambda _: None,
        )
        assert {r.phone_number for r in client.fetch_tag("gz").reports} == {"+331"}
