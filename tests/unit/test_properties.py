"""Property-based tests: arbitrary provider answers never crash the client with anything
but our own errors, and the forward-only merge does not depend on arrival order, even
between duplicates within one answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import reduce

import httpx
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import SmsPartnerStatusError
from daemon.smspartner import SmsPartnerClient
from daemon.status import Report, Status, merge, merge_reports, status_advances

KEY = "prop-key-123"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
item = st.fixed_dictionaries(
    {},
    optional={
        "phoneNumber": json_values | st.from_regex(r"\+336\d{8}", fullmatch=True),
        "status": json_values
        | st.sampled_from(
            ["Delivered", "delivered", "Not delivered", "Waiting", "ko", "KO", "Sent"]
        ),
        "stopSMS": json_values | st.sampled_from(["0", "1", 0, 1, True, False]),
        "date": json_values | st.integers(0, 2_000_000_000).map(str),
    },
)
envelope = st.fixed_dictionaries(
    {},
    optional={
        "success": json_values | st.booleans(),
        "code": json_values | st.sampled_from([200, 1, 4, 10, 429, 500]),
        "currentPage": json_values | st.integers(-2, 3),
        "total": json_values | st.integers(-1, 10),
        "StatutResponse_List": json_values | st.lists(item | json_values, max_size=6),
        "message": json_values,
    },
)
bodies = (
    envelope.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text()
    | st.binary().map(lambda b: b.decode("latin-1"))
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.lists(bodies, min_size=1, max_size=4), status=st.sampled_from([200, 400, 500]))
def test_any_answer_gives_reports_or_one_of_our_errors(pages: list[str], status: int) -> None:
    answers = iter(pages)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, text=next(answers, "{}"), headers={"Content-Type": "application/json"}
        )

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as http,
        structlog.testing.capture_logs(),
    ):
        client = SmsPartnerClient(
            http,
            api_key=KEY,
            base_url="http://sms.test/v1",
            max_retries=0,
            rate_limit_per_second=0,
            max_pages=5,
            sleep=lambda _: None,
        )
        try:
            result = client.fetch_tag("prop")
        except SmsPartnerStatusError as exc:
            assert KEY not in str(exc)
            return
    assert all(isinstance(r, Report) and r.phone_number for r in result.reports)
    assert result.pages <= 5


T0 = datetime(2026, 11, 26, tzinfo=UTC)
#: Few values of each field, so that equal dates, equal statuses and the same number
#: seen several times in one answer are common, not rare.
reports = st.builds(
    Report,
    phone_number=st.sampled_from(["+33600000000", "+33600000001", "+33600000002"]),
    status=st.sampled_from([s for s in Status if s is not Status.EXPIRED]),  # ours only
    provider_status=st.sampled_from(["a", "b"]),
    stop_sms=st.booleans(),
    reported_at=st.none() | st.integers(0, 3).map(lambda m: T0 + timedelta(minutes=m)),
)


@settings(max_examples=1000, deadline=None)
@given(batch=st.lists(reports, min_size=1, max_size=8), data=st.data())
def test_merging_one_answer_does_not_depend_on_the_order_of_its_items(
    batch: list[Report], data: st.DataObject
) -> None:
    """Duplicates within one answer included: two final statuses at one date, two
    spellings of one status, undated reports. Every field of the result is the same."""
    shuffled = data.draw(st.permutations(batch))
    assert merge_reports(batch) == merge_reports(shuffled)
    one = [r for r in batch if r.phone_number == batch[0].phone_number]
    first = reduce(lambda old, new: merge(new, old), one)
    second = reduce(lambda old, new: merge(new, old), data.draw(st.permutations(one)))
    assert first == second


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(reports, min_size=1, max_size=8))
def test_the_merged_report_is_never_behind_any_item_of_its_number(batch: list[Report]) -> None:
    """The order-free choice is still the forward-only one: no item of the answer would
    advance the report kept for its number."""
    merged = merge_reports(batch)
    for report in batch:
        kept = merged[report.phone_number]
        assert not status_advances(report, kept)
        assert kept.stop_sms or not report.stop_sms
