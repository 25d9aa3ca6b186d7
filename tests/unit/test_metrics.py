"""Metrics as a scraper sees them: the rendered Prometheus text, parsed back."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics
from daemon.poller import PollResult


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered text, keyed by name and sorted labels."""
    data, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(data.decode())
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_polls_rows_changed_and_optouts_are_counted() -> None:
    metrics = Metrics()
    metrics.observe_poll(PollResult("a", "ok", "active", changed=3, optouts=1))
    metrics.observe_poll(PollResult("b", "ok", "completed", changed=2))
    metrics.observe_poll(PollResult("c", "transient_error", "active", error="HTTP 502"))
    metrics.observe_poll(PollResult("d", "auth_error", "active"))

    assert value(metrics, "smspartner_status_polls_total", outcome="ok") == 2
    assert value(metrics, "smspartner_status_polls_total", outcome="transient_error") == 1
    assert value(metrics, "smspartner_status_polls_total", outcome="auth_error") == 1
    # Every outcome is exported from the start, so alerts on rate() see a zero.
    assert value(metrics, "smspartner_status_polls_total", outcome="api_error") == 0
    assert value(metrics, "smspartner_status_rows_changed_total") == 5
    assert value(metrics, "smspartner_status_optouts_total") == 1


def test_time_to_final_histogram_spans_seconds_to_the_48h_window() -> None:
    metrics = Metrics()
    metrics.observe_final_delays([4.0, 25.0, 3600.0, 47 * 3600.0, -2.0])

    name = "smspartner_status_time_to_final_seconds"
    assert value(metrics, name + "_count") == 5
    assert value(metrics, name + "_sum") == 4 + 25 + 3600 + 47 * 3600  # -2 counts as 0
    assert value(metrics, name + "_bucket", le="10.0") == 2
    assert value(metrics, name + "_bucket", le="30.0") == 3
    assert value(metrics, name + "_bucket", le="3600.0") == 4
    assert value(metrics, name + "_bucket", le="172800.0") == 5
    assert value(metrics, name + "_bucket", le="+Inf") == 5


def test_api_latency_by_status_with_error_for_no_response() -> None:
    metrics = Metrics()
    metrics.observe_api_request(0.2, 200)
    metrics.observe_api_request(0.03, 429)
    metrics.observe_api_request(12.0, None)

    name = "smspartner_status_api_request_seconds"
    assert value(metrics, name + "_count", status="200") == 1
    assert value(metrics, name + "_bucket", status="200", le="0.25") == 1
    assert value(metrics, name + "_bucket", status="200", le="0.1") == 0
    assert value(metrics, name + "_count", status="429") == 1
    assert value(metrics, name + "_count", status="error") == 1


def test_httpx_hooks_time_each_request_without_the_key_in_any_label() -> None:
    metrics = Metrics()

    def provider(request: httpx.Request) -> httpx.Response:
        status = 200 if request.url.params["page"] == "1" else 503
        return httpx.Response(status, json={"success": True})

    with httpx.Client(
        transport=httpx.MockTransport(provider), event_hooks=metrics.httpx_event_hooks()
    ) as client:
        url = "https://api.example/v1/bulk-status-by-tag"
        client.get(url, params={"apiKey": "s3cret-key", "tag": "t", "page": 1})
        client.get(url, params={"apiKey": "s3cret-key", "tag": "t", "page": 2})

    name = "smspartner_status_api_request_seconds"
    assert value(metrics, name + "_count", status="200") == 1
    assert value(metrics, name + "_count", status="503") == 1
    text = metrics.render()[0].decode()
    assert "s3cret-key" not in text
    assert "api.example" not in text


def test_gauges_exist_before_any_refresh() -> None:
    metrics = Metrics()
    assert value(metrics, "smspartner_status_numbers_waiting") == 0
    assert value(metrics, "smspartner_status_oldest_waiting_seconds") == 0
    for state in ("active", "completed", "expired", "untracked"):
        assert value(metrics, "smspartner_status_tags", state=state) == 0


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # the global registry would refuse the second
    first.observe_poll(PollResult("a", "ok", "active", changed=1))
    assert value(first, "smspartner_status_rows_changed_total") == 1
    assert value(second, "smspartner_status_rows_changed_total") == 0

    registry = CollectorRegistry()
    assert Metrics(registry).registry is registry


def test_a_fetch_disagreeing_with_total_is_counted() -> None:
    from daemon.smspartner import SmsPartnerClient

    def lying(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        items = [{"phoneNumber": f"+3361{page}", "status": "Waiting"}] if page <= 2 else []
        return httpx.Response(200, json={"total": 1, "StatutResponse_List": items})

    metrics = Metrics()
    with httpx.Client(transport=httpx.MockTransport(lying)) as http:
        client = SmsPartnerClient(
            http,
            api_key="k-12345678",
            base_url="http://sms.test/v1",
            rate_limit_per_second=0,
            on_total_mismatch=metrics.observe_total_mismatch,
        )
        assert value(metrics, "smspartner_status_api_total_mismatches_total") == 0
        assert client.fetch_tag("t").items == 2  # both pages, whatever total says
    assert value(metrics, "smspartner_status_api_total_mismatches_total") == 1
