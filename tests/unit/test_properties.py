"""Property-based tests: arbitrary provider answers never crash the client with anything
but our own errors, and the forward-only merge does not depend on arrival order."""

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
from daemon.status import PROVIDER_FINAL, Report, Status, merge, merge_reports

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
reports = st.builds(
    Report,
    phone_number=st.just("+33600000000"),
    status=st.sampled_from([s for s in Status if s is not Status.EXPIRED]),  # ours only
    provider_status=st.sampled_from(["a", "b"]),
    stop_sms=st.booleans(),
    reported_at=st.none() | st.integers(0, 100).map(lambda m: T0 + timedelta(minutes=m)),
)


def _distinct_final_dates(batch: list[Report]) -> bool:
    # Two different final statuses with the same date: design.md keeps "what is stored",
    # which by definition depends on order. Every other combination must not.
    finals = [(r.reported_at, r.status) for r in batch if r.status in PROVIDER_FINAL]
    dates = [d for d, _ in finals]
    return len(set(dates)) == len(dates)


@settings(max_examples=500, deadline=None)
@given(
    batch=st.lists(reports, min_size=1, max_size=6).filter(_distinct_final_dates), data=st.data()
)
def test_forward_only_merge_is_order_independent(batch: list[Report], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(batch))
    first = reduce(lambda old, new: merge(new, old), batch)
    second = reduce(lambda old, new: merge(new, old), shuffled)
    assert (first.status, first.stop_sms, first.reported_at) == (
        second.status,
        second.stop_sms,
        second.reported_at,
    )
    assert merge_reports(batch).keys() == merge_reports(shuffled).keys()
