"""The HTTP surface over loopback: a real server, a real database, a real httpx client.

Raw paths (``/tags/../x``) go through ``http.client``, because httpx normalises dot
segments before sending, as browsers do.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from daemon import migrate, queries, store, tracking
from daemon.db import create_engine, tracked_tags
from daemon.errors import ConfigError
from daemon.health import Health
from daemon.http import MAX_BODY, HttpServer
from daemon.metrics import Metrics
from daemon.output import TAG_COLUMNS, plain
from daemon.settings import load_settings
from daemon.status import Report, Status

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
TOKEN = "T0ken-s3cret/+="


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class App:
    """A running server and everything around it."""

    server: HttpServer
    client: httpx.Client
    engine: Engine
    health: Health
    clock: Clock
    metrics: Metrics
    wakes: list[datetime] = field(default_factory=list)

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One request with the path sent exactly as given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            found = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        assert found["content-type"] == "application/json"
        return response.status, found, json.loads(data) if data else None


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    """Build and start servers; everything is closed at the end of the test."""
    closers: list[Callable[[], None]] = []

    def make(
        url: str | None = None,
        *,
        token: str | None = None,
        beat: bool = True,
        migrated: bool = True,
        wake: Callable[[], None] | None = None,
        **limits: float,
    ) -> App:
        url = url or f"sqlite:///{tmp_path / 't.db'}"
        engine = create_engine(url)
        closers.append(engine.dispose)
        if migrated:
            migrate.upgrade(engine)
        overrides: dict[str, object] = {"database_url": url, "http_port": 0}
        if token:
            overrides["http_token"] = token
        settings = load_settings({}, **overrides)
        clock = Clock()
        health = Health(clock)
        if beat:
            health.beat()
        metrics = Metrics()
        wakes: list[datetime] = []
        server = HttpServer(
            host="127.0.0.1",
            port=0,
            engine=engine,
            health=health,
            metrics=metrics,
            settings=settings,
            clock=clock,
            wake=wake or (lambda: wakes.append(clock())),
            **limits,  # type: ignore[arg-type]  # max_connections, request_deadline…
        )
        server.start()
        closers.append(server.stop)
        client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5)
        closers.append(client.close)
        return App(server, client, engine, health, clock, metrics, wakes)

    yield make
    for close in reversed(closers):
        close()


@pytest.fixture
def app(make_app: Callable[..., App]) -> App:
    return make_app()


def body(response: httpx.Response) -> Any:
    """The JSON answer (every route but /metrics answers JSON)."""
    assert response.headers["content-type"] == "application/json"
    return response.json()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- probes ---------------------------------------------------------------------------------


def test_healthz_is_ok_while_the_loop_beats_and_stalled_after(app: App) -> None:
    response = app.client.get("/healthz")
    assert (response.status_code, body(response)) == (200, {"status": "ok"})

    app.clock.advance(seconds=61)
    response = app.client.get("/healthz")
    assert (response.status_code, body(response)) == (503, {"status": "stalled"})


def test_readyz_is_ready_then_lists_the_rejected_key(app: App) -> None:
    response = app.client.get("/readyz")
    assert (response.status_code, body(response)) == (200, {"status": "ready"})

    app.health.auth("Incorrect API Key")
    response = app.client.get("/readyz")
    assert response.status_code == 503
    assert body(response) == {
        "status": "not ready",
        "problems": ["API key rejected: Incorrect API Key"],
    }


def test_readyz_fails_when_the_loop_never_beat(make_app: Callable[..., App]) -> None:
    app = make_app(beat=False)
    response = app.client.get("/readyz")
    assert response.status_code == 503
    assert body(response)["problems"] == ["scheduler loop not running"]
    assert app.client.get("/healthz").status_code == 503


# --- /tags on both engines ------------------------------------------------------------------


def test_track_list_metrics_and_untrack(make_app: Callable[..., App], db_url: str) -> None:
    app = make_app(db_url)

    response = app.client.post("/tags", json={"tag": "nov-promo", "sent_at": "2026-11-26T08:30"})
    assert response.status_code == 201
    created = body(response)
    assert created["tag"] == "nov-promo"
    assert created["sent_at"] == "2026-11-26T08:30:00Z"  # no offset means UTC
    assert created["window_ends_at"] == "2026-11-28T08:30:00Z"
    assert created["state"] == "active"
    assert created["warnings"] == []
    assert "lease_owner" not in created and "lease_expires_at" not in created
    assert response.headers["location"] == "/tags/nov-promo"
    assert app.wakes == [T0]

    with app.engine.begin() as conn:
        waiting = Report("+33600000001", Status.WAITING, "Waiting", False, None)
        delivered = Report("+33600000002", Status.DELIVERED, "Delivered", True, T0)
        store.apply_reports(
            conn, "nov-promo", {r.phone_number: r for r in (waiting, delivered)}, now=T0
        )
    app.clock.advance(minutes=30)

    response = app.client.get("/tags")
    assert response.status_code == 200
    [listed] = body(response)
    assert listed["tag"] == "nov-promo"
    assert listed["created_at"] == "2026-11-26T09:00:00Z"
    assert {k: listed[k] for k in ("total", "waiting", "delivered", "stop_sms")} == {
        "total": 2,
        "waiting": 1,
        "delivered": 1,
        "stop_sms": 1,
    }
    assert listed["delivery_rate"] == pytest.approx(0.5)
    assert "lease_owner" not in listed

    response = app.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    assert samples[("smspartner_status_numbers_waiting", ())] == 1
    assert samples[("smspartner_status_oldest_waiting_seconds", ())] == 30 * 60
    assert samples[("smspartner_status_tags", (("state", "active"),))] == 1

    response = app.client.delete("/tags/nov-promo")
    assert (response.status_code, body(response)) == (
        200,
        {"tag": "nov-promo", "state": "untracked"},
    )
    assert body(app.client.get("/tags"))[0]["state"] == "untracked"
    samples = metric_samples(app.client.get("/metrics").text)
    # An untracked tag's numbers are no longer waiting for anything.
    assert samples[("smspartner_status_numbers_waiting", ())] == 0
    assert samples[("smspartner_status_oldest_waiting_seconds", ())] == 0
    assert samples[("smspartner_status_tags", (("state", "untracked"),))] == 1

    app.health.beat()
    assert app.client.get("/readyz").status_code == 200


def test_sent_at_defaults_to_now_and_offsets_become_utc(app: App) -> None:
    response = app.client.post("/tags", json={"tag": "a"})
    assert body(response)["sent_at"] == "2026-11-26T09:00:00Z"

    response = app.client.post("/tags", json={"tag": "b", "sent_at": "2026-11-26T10:00:00+02:00"})
    assert body(response)["sent_at"] == "2026-11-26T08:00:00Z"

    assert [t["tag"] for t in body(app.client.get("/tags"))] == ["a", "b"]  # ordered by tag
    assert len(app.wakes) == 2


def test_suspicious_tags_are_tracked_with_warnings_and_unknown_fields_ignored(app: App) -> None:
    response = app.client.post("/tags", json={"tag": "Campaign-November-2026", "priority": "high"})
    assert response.status_code == 201
    warnings = body(response)["warnings"]
    assert len(warnings) == 2
    assert any("20 characters" in w for w in warnings)
    assert any("lowercase" in w for w in warnings)


def test_re_tracking_re_activates_an_untracked_tag(app: App) -> None:
    app.client.post("/tags", json={"tag": "t", "sent_at": "2026-11-26T08:00:00Z"})
    app.client.delete("/tags/t")
    response = app.client.post("/tags", json={"tag": "t", "sent_at": "2026-11-27T08:00:00Z"})
    assert response.status_code == 201
    assert body(response)["state"] == "active"
    assert body(response)["window_ends_at"] == "2026-11-29T08:00:00Z"


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "names"),
    [
        pytest.param(b'{"tag": "a"', "JSON", id="broken-json"),
        pytest.param(b"", "JSON", id="empty"),
        pytest.param(b'{"tag": "caf\xe9"}', "UTF-8", id="latin-1-bytes"),
        pytest.param(b"[]", "body must be a JSON object", id="array"),
        pytest.param(b'"nov-promo"', "body must be a JSON object", id="string"),
        pytest.param(b"{}", "tag is required", id="missing-tag"),
        pytest.param(b'{"tag": null}', "tag is required", id="null-tag"),
        pytest.param(b'{"tag": 5}', "tag must be a string", id="number-tag"),
        pytest.param(b'{"tag": ""}', "tag must not be empty", id="empty-tag"),
        pytest.param(b'{"tag": "nov promo"}', "tag must not contain whitespace", id="space"),
        pytest.param(b'{"tag": "a\\u0007b"}', "tag must contain printable", id="control"),
        pytest.param(b'{"tag": "\\ud800"}', "tag must contain printable", id="surrogate"),
        pytest.param(
            json.dumps({"tag": "x" * 65}).encode(), "tag must be at most 64", id="65-chars"
        ),
        pytest.param(b'{"tag": "a", "sent_at": "yesterday"}', "sent_at", id="bad-sent-at"),
        pytest.param(b'{"tag": "a", "sent_at": 1764147600}', "sent_at", id="number-sent-at"),
        pytest.param(
            b'{"tag": "a", "sent_at": "0001-01-01T00:00:00+01:00"}', "sent_at", id="overflow"
        ),
        pytest.param(
            b'{"tag": "a", "sent_at": "9999-12-31T23:00:00Z"}', "sent_at", id="window-overflow"
        ),
        pytest.param(b"[" * 50_000, "JSON", id="deeply-nested"),
    ],
)
def test_bad_bodies_get_400_naming_the_field(app: App, content: bytes, names: str) -> None:
    response = app.client.post(
        "/tags", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = body(response)["error"]
    assert names in error
    assert "\n" not in error
    assert body(app.client.get("/tags")) == []
    assert app.wakes == []


def test_a_body_over_64_kib_is_refused_before_reading(app: App) -> None:
    content = json.dumps({"tag": "big", "pad": "x" * 100 * 1024}).encode()
    response = app.client.post("/tags", content=content)
    assert response.status_code == 413
    assert str(MAX_BODY) in body(response)["error"]
    assert body(app.client.get("/tags")) == []


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json; charset=utf-8",
        "application/x-www-form-urlencoded",  # what `curl -d` sends unless told otherwise
        "text/plain",
        "application/octet-stream",
    ],
)
def test_a_json_body_is_accepted_whatever_its_content_type(
    app: App, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = app.client.post("/tags", content=b'{"tag": "summer"}', headers=headers)
    assert response.status_code == 201, response.text
    assert body(response)["tag"] == "summer"
    assert [t["tag"] for t in body(app.client.get("/tags"))] == ["summer"]


def test_a_body_that_is_not_json_is_a_400_naming_the_problem(app: App) -> None:
    # `curl -d tag=summer`: a form, whatever the Content-Type says.
    for content_type in ("application/x-www-form-urlencoded", "application/json"):
        response = app.client.post(
            "/tags", content=b"tag=summer", headers={"Content-Type": content_type}
        )
        assert response.status_code == 400
        assert body(response)["error"].startswith("body is not valid JSON: ")
    assert body(app.client.get("/tags")) == []
    assert app.wakes == []


def test_the_curl_examples_of_the_deploy_files_work(make_app: Callable[..., App]) -> None:
    # deploy/kubernetes/deployment.yaml: POST {"tag": "spring-sale"} with the bearer
    # token, sent as curl sends it: `curl -X POST URL -H 'Authorization: Bearer …' -d '…'`.
    app = make_app(token=TOKEN)
    data = b'{"tag": "spring-sale"}'
    curl = {
        "User-Agent": "curl/8.5.0",
        "Accept": "*/*",
        "Authorization": "Bearer " + TOKEN,
        "Content-Type": "application/x-www-form-urlencoded",
        "Content-Length": str(len(data)),
    }
    status, headers, answer = app.raw("POST", "/tags", body=data, headers=curl)
    assert (status, answer["tag"]) == (201, "spring-sale")
    assert headers["location"] == "/tags/spring-sale"
    # deploy/systemd/README.md: the same with -H 'Content-Type: application/json'.
    data = b'{"tag": "autumn"}'
    curl.update({"Content-Type": "application/json", "Content-Length": str(len(data))})
    status, _, answer = app.raw("POST", "/tags", body=data, headers=curl)
    assert (status, answer["tag"]) == (201, "autumn")


def test_length_rules_answer_the_same_json_errors(app: App) -> None:
    # A generator body goes out chunked, without Content-Length.
    response = app.client.post("/tags", content=iter([b'{"tag": "b"}']))
    assert response.status_code == 411
    assert "Content-Length" in body(response)["error"]

    status, _, answer = app.raw(
        "POST", "/tags", body=b'{"tag": "c"}', headers={"Content-Length": "twelve"}
    )
    assert status == 400 and "Content-Length" in answer["error"]

    status, _, answer = app.raw("POST", "/tags")  # http.client sends Content-Length: 0
    assert status == 400 and "JSON" in answer["error"]

    with socket.create_connection(("127.0.0.1", app.server.port), timeout=5) as sock:
        sock.sendall(b"POST /tags HTTP/1.0\r\nHost: x\r\n\r\n")  # no Content-Length at all
        with sock.makefile("rb") as answer_file:
            answer_bytes = answer_file.read()
    head, _, data = answer_bytes.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 411 ")
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert json.loads(data) == {"error": "Content-Length is required"}

    status, headers, answer = app.raw(
        "POST",
        "/tags",
        body=b"{}",
        headers={"Content-Type": "text/plain", "Content-Length": str(MAX_BODY + 1)},
    )
    assert status == 413 and headers["content-type"] == "application/json"
    assert answer == {"error": f"body must be at most {MAX_BODY} bytes (Content-Length is "
                      f"{MAX_BODY + 1})"}  # fmt: skip
    assert body(app.client.get("/tags")) == []


# --- DELETE and paths ------------------------------------------------------------------------


def test_delete_of_an_unknown_tag_is_404(app: App) -> None:
    response = app.client.delete("/tags/nope")
    assert (response.status_code, body(response)) == (404, {"error": "tag 'nope' is not tracked"})


def test_delete_decodes_the_path_segment_once(app: App) -> None:
    app.client.post("/tags", json={"tag": "a/b%41"})
    assert app.client.delete("/tags/a%2Fb%2541").status_code == 200
    assert body(app.client.get("/tags"))[0]["state"] == "untracked"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/tags/../healthz", 404),
        ("/tags/a/b", 404),
        ("/tags//", 404),
        ("/tags/", 400),
        ("/tags/%20", 400),
        ("/tags/a%09b", 400),
        ("/tags/%FF", 400),
        ("/tags/" + "x" * 65, 400),
        ("/tags/..", 404),
        ("/tags/%2e%2e%2fhealthz", 404),
        ("/tags/%00", 400),
    ],
)
def test_path_tricks_never_reach_5xx(app: App, path: str, status: int) -> None:
    for method in ("GET", "DELETE"):
        got, _, answer = app.raw(method, path)
        assert got == status, method
        assert answer["error"]


def test_unknown_routes_and_wrong_methods(app: App) -> None:
    response = app.client.get("/nope")
    assert response.status_code == 404 and body(response)["error"]
    assert app.client.get("/healthz/").status_code == 404

    for method, path, allow in [
        ("PUT", "/tags", "GET, HEAD, POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("POST", "/tags/x", "DELETE, GET, HEAD"),
        ("PUT", "/tags/x", "DELETE, GET, HEAD"),
        ("PATCH", "/readyz", "GET, HEAD"),
        ("OPTIONS", "/tags", "GET, HEAD, POST"),
    ]:
        response = app.client.request(method, path)
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allow
        if method != "HEAD":
            assert "not allowed" in body(response)["error"]

    # Methods http.server has no do_ method for were a 501 "not implemented": now every
    # method gets the route's answer (schemathesis sends TRACE and QUERY, expecting 405).
    for method in ("TRACE", "QUERY", "BREW"):
        status, headers, answer = app.raw(method, "/healthz")
        assert (status, headers["allow"]) == (405, "GET, HEAD") and answer["error"]
    assert app.raw("TRACE", "/nope")[0] == 404


def test_query_strings_are_ignored(app: App) -> None:
    assert app.client.get("/healthz", params={"verbose": "1"}).status_code == 200


# --- the bearer token --------------------------------------------------------------------


def test_writes_need_the_token_and_it_never_reaches_the_logs(
    make_app: Callable[..., App],
) -> None:
    app = make_app(token=TOKEN)
    good = {"Authorization": "Bearer " + TOKEN}
    with capture_logs() as logs:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = app.client.post("/tags", json={"tag": "a"}, headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "Bearer" in body(response)["error"]
        assert app.client.delete("/tags/a").status_code == 401
        assert app.wakes == []

        response = app.client.post("/tags", json={"tag": "a"}, headers=good)
        assert response.status_code == 201
        assert app.client.delete("/tags/a", headers=good).status_code == 200
        # Reads stay open: probes and scrapers carry no token.
        for path in ("/tags", "/healthz", "/readyz", "/metrics"):
            assert app.client.get(path).status_code == 200

    assert any(e["event"] == "http.request" and e["status"] == 401 for e in logs)
    assert any(e["event"] == "http.request" and e["method"] == "DELETE" for e in logs)
    assert TOKEN not in repr(logs)
    assert "Authorization" not in repr(logs)


ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the case under test: reachable from elsewhere


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [(ALL_INTERFACES, None, True), (ALL_INTERFACES, TOKEN, False), ("127.0.0.1", None, False)],
)
def test_writes_open_beyond_loopback_are_warned_about(
    tmp_path: Path, host: str, token: str | None, warned: bool
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'open.db'}")
    overrides: dict[str, object] = {"http_port": 0, **({"http_token": token} if token else {})}
    server = HttpServer(
        host=host,
        port=0,
        engine=engine,
        health=Health(Clock()),
        metrics=Metrics(),
        settings=load_settings({}, **overrides),
        clock=Clock(),
        wake=lambda: None,
    )
    try:
        with capture_logs() as logs:
            server.start()
    finally:
        server.stop()
        engine.dispose()
    open_warnings = [e for e in logs if e["event"] == "http.tags_open"]
    assert len(open_warnings) == (1 if warned else 0)
    assert all("SMSPARTNER_HTTP_TOKEN" in e["hint"] for e in open_warnings)


# --- a database that is down ---------------------------------------------------------------


def test_database_down_gives_503_without_secrets_and_metrics_still_serve(
    make_app: Callable[..., App],
) -> None:
    url = f"postgresql://smsp:hunter2@127.0.0.1:{free_port()}/nowhere"
    app = make_app(url, migrated=False)
    with capture_logs() as logs:
        response = app.client.get("/readyz")
        assert response.status_code == 503
        assert body(response) == {"status": "not ready", "problems": ["database unreachable"]}

        for response in (
            app.client.get("/tags"),
            app.client.post("/tags", json={"tag": "a"}),
            app.client.delete("/tags/a"),
        ):
            assert response.status_code == 503
            assert body(response) == {"error": "database unavailable"}

        response = app.client.get("/metrics")
        assert response.status_code == 200
        samples = metric_samples(response.text)
        assert samples[("smspartner_status_polls_total", (("outcome", "ok"),))] == 0

    assert app.wakes == []
    errors = [e for e in logs if e["event"] == "http.database_error"]
    assert len(errors) == 5
    assert "hunter2" not in repr(logs)


# --- robustness -----------------------------------------------------------------------------


def test_an_unexpected_error_is_a_json_500_and_the_write_is_kept(
    make_app: Callable[..., App],
) -> None:
    def broken_wake() -> None:
        raise RuntimeError("scheduler gone")

    app = make_app(wake=broken_wake)
    with capture_logs() as logs:
        response = app.client.post("/tags", json={"tag": "a"})
    assert (response.status_code, body(response)) == (500, {"error": "internal error"})
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["http.internal_error"]
    assert body(app.client.get("/tags"))[0]["tag"] == "a"  # committed before the wake


def test_a_stalled_client_does_not_block_others(app: App) -> None:
    with socket.create_connection(("127.0.0.1", app.server.port), timeout=5) as stalled:
        stalled.sendall(b"GET /heal")  # and never finishes the request line
        assert app.client.get("/healthz").status_code == 200
        # Hanging up ends that request, read as HTTP/0.9 "GET /heal" (so no status line):
        # its thread is not left over.
        stalled.shutdown(socket.SHUT_WR)
        with stalled.makefile("rb") as answer:
            assert answer.read() == b'{"error": "no such route"}'


def test_requests_timed_by_the_httpx_hooks_show_in_metrics(app: App) -> None:
    url = f"http://127.0.0.1:{app.server.port}/healthz"
    with httpx.Client(event_hooks=app.metrics.httpx_event_hooks(), timeout=5) as client:
        assert client.get(url).status_code == 200
    samples = metric_samples(app.client.get("/metrics").text)
    assert samples[("smspartner_status_api_request_seconds_count", (("status", "200"),))] == 1


def test_port_stop_and_a_busy_port(make_app: Callable[..., App], tmp_path: Path) -> None:
    app = make_app()
    assert app.server.port > 0
    engine = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    clash = HttpServer(
        host="127.0.0.1",
        port=app.server.port,
        engine=engine,
        health=app.health,
        metrics=Metrics(),
        settings=load_settings({}, http_port=0),
        clock=app.clock,
        wake=lambda: None,
    )
    try:
        with pytest.raises(ConfigError, match="SMSPARTNER_HTTP_PORT"):
            clash.start()
    finally:
        clash.stop()  # never started: a no-op
        engine.dispose()

    app.server.stop()
    app.server.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        app.client.get("/healthz")
    with pytest.raises(RuntimeError):
        app.server.start()


# --- GET /tags pages ---------------------------------------------------------------------

#: Tags that a cursor must survive in a URL: reserved characters, percent signs, non-ASCII.
WEIRD_TAGS = [
    "café",
    "日本語",
    "😀",
    "a+b",
    "a%2Fb",
    "a/b",
    "a&after=zzz",
    "a?b",
    "a#b",
    "a;rel=x",
    "<x>",
    '"q"',
    "a,b",
    "100%",
    "A",
    "~",
]


def track_tags(app: App, tags: list[str]) -> None:
    with app.engine.begin() as conn:
        tracking.track_many(conn, [(t, T0, T0 + timedelta(hours=48)) for t in tags], now=T0)


def next_link(response: httpx.Response) -> str | None:
    """The target of the ``rel="next"`` link, or None."""
    link = response.headers.get("link")
    if link is None:
        return None
    target, _, params = link.partition(";")
    assert params.strip() == 'rel="next"'
    assert target.startswith("<") and target.endswith(">")
    return target[1:-1]


def walk_rows(app: App, first: str) -> list[list[dict[str, Any]]]:
    """Follow ``Link: rel="next"`` from ``first``; the rows of each page."""
    pages: list[list[dict[str, Any]]] = []
    url: str | None = first
    while url is not None:
        response = app.client.get(url)
        assert response.status_code == 200, response.text
        pages.append(body(response))
        url = next_link(response)
        assert len(pages) < 100
    return pages


def walk(app: App, first: str) -> list[list[str]]:
    """The tags of each page, following ``Link`` from ``first``."""
    return [[t["tag"] for t in page] for page in walk_rows(app, first)]


def test_paging_yields_every_tag_exactly_once_in_tag_order(
    make_app: Callable[..., App], db_url: str
) -> None:
    app = make_app(db_url)
    tags = [f"t{i:03d}" for i in range(47)] + WEIRD_TAGS
    track_tags(app, tags)
    with app.engine.connect() as conn:  # the database's own order (its collation)
        ordered = list(conn.scalars(sa.select(tracked_tags.c.tag).order_by(tracked_tags.c.tag)))

    pages = walk(app, "/tags?limit=10")

    assert [len(p) for p in pages] == [10] * 6 + [3]  # 63 tags; Link absent on the last page
    assert [t for page in pages for t in page] == ordered
    assert sorted(ordered) == sorted(tags)


def test_each_page_carries_the_counts_of_tag_summary(
    make_app: Callable[..., App], db_url: str
) -> None:
    app = make_app(db_url)
    track_tags(app, ["a", "b", "c"])
    reports = {
        "a": [Report("+33600000001", Status.DELIVERED, "Delivered", True, T0)],
        "b": [
            Report("+33600000001", Status.WAITING, "Waiting", False, None),
            Report("+33600000002", Status.NOT_DELIVERED, "Not delivered", False, T0),
            Report("+33600000003", Status.DELIVERED, "Delivered", False, T0),
        ],
    }  # "c" has no numbers: zero counts and no rate
    with app.engine.begin() as conn:
        for tag, found in reports.items():
            store.apply_reports(conn, tag, {r.phone_number: r for r in found}, now=T0)
    with app.engine.connect() as conn:
        view = {row["tag"]: row for row in queries.tag_summary(conn)}

    listed = [t for page in walk_rows(app, "/tags?limit=2") for t in page]

    assert [t["tag"] for t in listed] == ["a", "b", "c"]
    for tag in listed:
        assert {n: tag[n] for n in queries.SUMMARY_COUNTS} == pytest.approx(
            {n: view[tag["tag"]][n] for n in queries.SUMMARY_COUNTS}
        )
    assert (listed[1]["total"], listed[1]["delivery_rate"]) == (3, pytest.approx(1 / 3))
    assert (listed[2]["total"], listed[2]["delivery_rate"]) == (0, None)


def test_an_exact_multiple_of_the_limit_ends_without_an_empty_page(app: App) -> None:
    track_tags(app, [f"t{i}" for i in range(20)])
    assert [len(p) for p in walk(app, "/tags?limit=10")] == [10, 10]
    assert walk(app, "/tags?limit=1000") == [sorted(f"t{i}" for i in range(20))]


def test_the_default_page_is_100_and_the_link_carries_limit_and_an_encoded_cursor(
    app: App,
) -> None:
    track_tags(app, [f"t{i:03d}" for i in range(150)] + ["u/ü+"])
    response = app.client.get("/tags")
    assert len(body(response)) == 100
    assert next_link(response) == "/tags?limit=100&after=t099"

    response = app.client.get("/tags", params={"limit": "1", "after": "t149"})
    assert [t["tag"] for t in body(response)] == ["u/ü+"]
    assert next_link(response) is None
    response = app.client.get("/tags", params={"limit": "1", "after": "t148"})
    assert next_link(response) == "/tags?limit=1&after=t149"
    # A cursor that needs encoding is percent-encoded (RFC 3986), never left raw.
    status, headers, _ = app.raw("GET", "/tags?limit=50&after=t140")
    assert status == 200 and "link" not in headers
    track_tags(app, ["v"])
    status, headers, page = app.raw("GET", "/tags?limit=1&after=t149")
    assert [t["tag"] for t in page] == ["u/ü+"]
    assert headers["link"] == '</tags?limit=1&after=u%2F%C3%BC%2B>; rel="next"'


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("after=caf%C3%A9", ["~", "日本語", "😀"], id="percent-encoded-utf8"),
        pytest.param("after=%E6%97%A5%E6%9C%AC%E8%AA%9E", ["😀"], id="cjk"),
        pytest.param("after=a%2Bb", ["a,b", "a/b", "a;rel=x", "a?b"], id="encoded-plus"),
        pytest.param("after=a+b", ["a#b"], id="plus-is-a-space"),  # "a b" < "a#b"
        pytest.param("after=%F0%9F%98%80", [], id="past-the-end"),
        pytest.param("after=", ['"q"', "100%", "<x>", "A"], id="empty-is-the-start"),
        pytest.param("after=%3C", ["<x>", "A", "a#b", "a%2Fb"], id="not-a-tag"),
        pytest.param("after=%20%09x", ['"q"', "100%", "<x>", "A"], id="whitespace"),
    ],
)
def test_weird_cursors_are_compared_not_rejected(app: App, query: str, expected: list[str]) -> None:
    track_tags(app, WEIRD_TAGS)
    limit = len(expected) if expected else 1
    response = app.client.get(f"/tags?limit={limit}&{query}")
    assert response.status_code == 200, response.text
    assert [t["tag"] for t in body(response)] == expected


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("limit=0", "limit must be a whole number from 1 to 1000"),
        ("limit=1001", "limit must be"),
        ("limit=-1", "limit must be"),
        ("limit=ten", "limit must be"),
        ("limit=1.5", "limit must be"),
        ("limit=", "limit must be"),
        ("limit=%D9%A1%D9%A0", "limit must be"),  # Arabic-Indic "10"
        ("limit=1_0", "limit must be"),
        ("limit=%2010", "limit must be"),
        ("limit=0000000001000", "limit must be"),
        ("limit=9" * 5000, "limit must be"),
        ("limit=5&limit=6", "limit must be given at most once"),
        ("after=a&after=b", "after must be given at most once"),
        ("after=%FF", "after is not valid UTF-8"),
        ("after=%ED%A0%80", "after is not valid UTF-8"),  # a lone surrogate, encoded
        ("after=a%00b", "after must not contain NUL"),
        ("after=" + "x" * 300, "after must be at most 256 characters"),
    ],
)
def test_bad_page_parameters_get_400_naming_the_parameter(app: App, query: str, names: str) -> None:
    track_tags(app, ["a"])
    status, _, answer = app.raw("GET", f"/tags?{query}")
    assert status == 400
    assert names in answer["error"]
    assert "\n" not in answer["error"]


def test_limit_1000_is_allowed_and_unknown_parameters_are_ignored(app: App) -> None:
    track_tags(app, [f"t{i:04d}" for i in range(1001)])
    response = app.client.get("/tags", params={"limit": "1000", "sort": "x", "offset": "5"})
    assert response.status_code == 200
    assert len(body(response)) == 1000
    assert next_link(response) == "/tags?limit=1000&after=t0999"


def test_a_long_last_error_is_cut_in_the_listing(app: App) -> None:
    track_tags(app, ["a"])
    with app.engine.begin() as conn:
        conn.execute(sa.update(tracked_tags).values(last_error="x" * 100_000))
    [listed] = body(app.client.get("/tags"))
    assert listed["last_error"] == "x" * 500 + "…"
    assert body(app.client.get("/tags/a")) == listed  # one tag is bounded the same way


# --- HEAD -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/tags", "/tags?limit=1", "/tags/a", "/metrics"]
)
def test_head_answers_as_get_without_a_body(app: App, path: str) -> None:
    track_tags(app, ["a", "b"])
    got = app.client.get(path)
    head = app.client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers.get("link") == got.headers.get("link")
    if path != "/metrics":  # metrics move between two scrapes
        assert head.headers["content-length"] == str(len(got.content))


def test_head_gives_the_same_failures_as_get(app: App) -> None:
    app.clock.advance(seconds=61)  # the loop stalled
    assert app.client.head("/healthz").status_code == 503
    head = app.client.head("/tags?limit=0")
    assert (head.status_code, head.content) == (400, b"")
    head = app.client.head("/nope")
    assert (head.status_code, head.content) == (404, b"")


# --- malformed bodies are 4xx, never 5xx -----------------------------------------------------

DIGITS = b"1" * 5000


@pytest.mark.parametrize(
    ("content", "names"),
    [
        pytest.param(b'{"tag": ' + DIGITS + b"}", "JSON", id="5000-digit-tag"),
        pytest.param(b'{"tag": "a", "n": ' + DIGITS + b"}", "JSON", id="5000-digit-extra"),
        pytest.param(b'{"tag": "a", "sent_at": -' + DIGITS + b"}", "JSON", id="5000-digit-neg"),
        pytest.param(b"[" * 30_000 + b"]" * 30_000, "JSON", id="deep-but-closed"),
        pytest.param(
            b'{"tag": "a", "x": ' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"}",
            "JSON",
            id="deep-inside-object",
        ),
        pytest.param(b'{"tag": "a\\u0000b"}', "tag must contain printable", id="nul-escape"),
        pytest.param(b'{"tag": "a\x00b"}', "JSON", id="raw-nul"),
        pytest.param(b'{"tag": "a", "sent_at": "\\udc80"}', "sent_at", id="surrogate-sent-at"),
        pytest.param(b'{"tag": "\\udfff\\ud800"}', "tag must contain printable", id="surrogates"),
        pytest.param(b'{"tag": "a\xed\xa0\x80"}', "UTF-8", id="encoded-surrogate"),
        pytest.param(b'{"tag": "a\xc0\xaf"}', "UTF-8", id="overlong"),
        pytest.param('{"tag": "a"}'.encode("utf-16"), "UTF-8", id="utf-16"),
        pytest.param(b'\xef\xbb\xbf{"tag": "a"}', "JSON", id="bom"),
        pytest.param(b'{"tag": ["a"]}', "tag must be a string (got array)", id="array-tag"),
        pytest.param(b'{"tag": {"a": 1}}', "tag must be a string (got object)", id="object-tag"),
        pytest.param(b'{"tag": true}', "tag must be a string (got boolean)", id="bool-tag"),
        pytest.param(b'{"tag": 1e999}', "tag must be a string (got number)", id="inf-tag"),
        pytest.param(b'{"tag": NaN}', "tag must be a string (got number)", id="nan-tag"),
        pytest.param(b'{"tag": "a", "sent_at": {}}', "sent_at must be an ISO-8601", id="obj-sent"),
        pytest.param(b'{"tag": "a", "sent_at": ""}', "sent_at", id="empty-sent-at"),
        pytest.param(b"null", "got null", id="null"),
        pytest.param(b"42", "got number", id="number"),
        pytest.param(b"true", "got boolean", id="true"),
        pytest.param(b" \t\r\n", "JSON", id="blank"),
    ],
)
def test_malformed_bodies_get_4xx_naming_the_problem(app: App, content: bytes, names: str) -> None:
    with capture_logs() as logs:
        response = app.client.post("/tags", content=content)
    assert response.status_code == 400, response.text
    error = body(response)["error"]
    assert names in error
    assert "\n" not in error and len(error) < 300
    assert not [e for e in logs if e["log_level"] == "error"]
    assert body(app.client.get("/tags")) == []


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.sampled_from(["tag", "sent_at", "x"]), inner, max_size=3)
            ),
            max_leaves=10,
        ).map(lambda value: json.dumps(value).encode()),
        st.builds(
            lambda tag, sent_at: json.dumps({"tag": tag, "sent_at": sent_at}).encode(),
            st.text(max_size=70),
            st.none() | st.text(max_size=40),
        ),
    )
)
def test_no_body_makes_post_tags_answer_5xx(app: App, content: bytes) -> None:
    response = app.client.post("/tags", content=content)
    assert response.status_code in (201, 400), (response.status_code, response.text)


# --- bounded connections and whole-request deadlines ---------------------------------------


def eventually(check: Callable[[], bool], within: float = 1.0) -> bool:
    """Whether ``check`` holds within ``within`` seconds (tried every 20 ms)."""
    give_up = time.monotonic() + within
    while not check():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.02)
    return True


def connect(app: App) -> socket.socket:
    return socket.create_connection(("127.0.0.1", app.server.port), timeout=5)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def trickle(sock: socket.socket, data: bytes, every: float = 0.05, give_up: float = 2.0) -> float:
    """Send ``data`` a byte at a time until the server closes; seconds until it did."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.send(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], every)
            if readable and sock.recv(65536) == b"":
                break
        except OSError:  # reset: the server closed and we kept sending
            break
        if time.monotonic() - started > give_up:
            pytest.fail(f"still connected after {give_up} s of trickling")
    return time.monotonic() - started


def test_connections_past_the_cap_get_a_quick_503(make_app: Callable[..., App]) -> None:
    app = make_app(max_connections=3)
    idle = [connect(app) for _ in range(3)]  # connected, and sending nothing
    try:
        with capture_logs() as logs:
            started = time.monotonic()
            with connect(app) as extra:
                extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                answer = read_all(extra)
            elapsed = time.monotonic() - started
            response = app.client.get("/healthz")
        assert elapsed < 0.5
        head, _, data = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 503 ")
        assert b"\r\nRetry-After: 1" in head
        assert json.loads(data) == {"error": "too many connections"}
        assert (response.status_code, body(response)) == (503, {"error": "too many connections"})
        # One warning for a burst of refusals, not one line per connection.
        busy = [e for e in logs if e["event"] == "http.busy"]
        assert [(e["log_level"], e["max_connections"]) for e in busy] == [("warning", 3)]
    finally:
        for sock in idle:
            sock.close()
    # The slots come back as soon as those clients hang up.
    assert eventually(lambda: app.client.get("/healthz").status_code == 200)


def test_idle_connections_are_cut_at_the_deadline_and_free_their_slots(
    make_app: Callable[..., App],
) -> None:
    app = make_app(max_connections=2, request_deadline=0.5)
    started = time.monotonic()
    silent, partial = connect(app), connect(app)
    with silent, partial:
        partial.sendall(b"GET /hea")
        assert app.client.get("/healthz").status_code == 503  # both slots taken
        # Cut off at the deadline, with no answer: "GET /hea" was not a request.
        assert (read_all(silent), read_all(partial)) == (b"", b"")
        assert 0.4 < time.monotonic() - started < 1.0
    assert eventually(lambda: app.client.get("/healthz").status_code == 200)


def test_a_client_trickling_its_headers_is_cut_off_within_the_deadline(
    make_app: Callable[..., App],
) -> None:
    app = make_app(request_deadline=0.5)
    with connect(app) as slow:
        slow.sendall(b"GET /healthz HTTP/1.0\r\n")
        assert app.client.get("/healthz").status_code == 200  # others are served meanwhile
        # One byte every 50 ms: no single read ever waits long, the request never ends.
        elapsed = trickle(slow, b"X-Pad: " + b"a" * 100)
    assert elapsed < 0.9
    assert app.client.get("/healthz").status_code == 200


def test_a_trickled_body_is_cut_off_and_its_truncation_never_tracked(
    make_app: Callable[..., App],
) -> None:
    app = make_app(request_deadline=0.5)
    start = b'{"tag": "slow"}'
    with connect(app) as slow:
        slow.sendall(
            b"POST /tags HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + start
        )
        # The body is valid JSON at every step: only its length says it is not done.
        elapsed = trickle(slow, b" " * (100 - len(start)))
    assert elapsed < 0.9
    assert body(app.client.get("/tags")) == []
    assert app.wakes == []


@pytest.mark.parametrize("length", ["1" * 5000, "9" * 19, str(2**64)])
def test_an_absurd_content_length_is_a_413(app: App, length: str) -> None:
    status, _, answer = app.raw(
        "POST", "/tags", body=b'{"tag": "a"}', headers={"Content-Length": length}
    )
    assert status == 413
    assert answer["error"].startswith(f"body must be at most {MAX_BODY} bytes")
    assert len(answer["error"]) < 200
    assert body(app.client.get("/tags")) == []


def test_raw_utf8_in_the_target_reads_as_percent_encoded_utf8(app: App) -> None:
    track_tags(app, ["a", "café", "d"])

    def send(target: bytes) -> bytes:
        with connect(app) as sock:
            sock.sendall(b"%s HTTP/1.0\r\n\r\n" % target)
            return read_all(sock)

    head, _, data = send(b"GET /tags?limit=1&after=caf\xc3\xa9").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert [t["tag"] for t in json.loads(data)] == ["d"]
    head, _, data = send(b"DELETE /tags/caf\xc3\xa9").partition(b"\r\n\r\n")
    assert json.loads(data) == {"tag": "café", "state": "untracked"}
    head, _, data = send(b"GET /tags?after=caf\xe9").partition(b"\r\n\r\n")  # Latin-1
    assert head.startswith(b"HTTP/1.0 400 ") and b"after is not valid UTF-8" in data


# --- GET /tags/{tag} --------------------------------------------------------------------------


def test_one_tag_is_its_row_of_the_listing_with_the_fields_of_tags_json(
    make_app: Callable[..., App], db_url: str
) -> None:
    app = make_app(db_url)
    track_tags(app, ["a", "nov-promo", "z"])
    with app.engine.begin() as conn:
        found = [
            Report("+33600000001", Status.DELIVERED, "Delivered", True, T0),
            Report("+33600000002", Status.WAITING, "Waiting", False, None),
        ]
        store.apply_reports(conn, "nov-promo", {r.phone_number: r for r in found}, now=T0)

    response = app.client.get("/tags/nov-promo")

    assert response.status_code == 200
    tag = body(response)
    listed = {t["tag"]: t for t in body(app.client.get("/tags"))}
    assert tag == listed["nov-promo"]
    with app.engine.connect() as conn:
        [row] = [r for r in queries.list_tags(conn) if r["tag"] == "nov-promo"]
        [view] = queries.tag_summary(conn, "nov-promo")
    assert {c: tag[c] for c in TAG_COLUMNS} == {c: plain(row[c]) for c in TAG_COLUMNS}
    assert {c: tag[c] for c in queries.SUMMARY_COUNTS} == pytest.approx(
        {c: view[c] for c in queries.SUMMARY_COUNTS}
    )
    assert (tag["total"], tag["delivered"], tag["waiting"], tag["stop_sms"]) == (2, 1, 1, 1)
    assert "lease_owner" not in tag


def test_a_tag_never_tracked_is_a_404_and_an_untracked_one_is_still_there(app: App) -> None:
    response = app.client.get("/tags/spring")
    assert response.status_code == 404
    assert body(response) == {"error": "tag 'spring' was never tracked"}
    assert app.client.head("/tags/spring").status_code == 404

    app.client.post("/tags", json={"tag": "spring"})
    app.client.delete("/tags/spring")
    response = app.client.get("/tags/spring")
    assert (response.status_code, body(response)["state"]) == (200, "untracked")
    assert (body(response)["total"], body(response)["delivery_rate"]) == (0, None)


def test_the_tag_in_the_path_is_percent_decoded_once(app: App) -> None:
    for tag in ("a/b%41", "café", "100%", "?#&"):
        created = app.client.post("/tags", json={"tag": tag})
        assert created.status_code == 201
        # The Location of a new tag is now an address that answers: the tag itself.
        assert body(app.client.get(created.headers["location"]))["tag"] == tag
    assert body(app.client.get("/tags/a%2Fb%2541"))["tag"] == "a/b%41"
    assert body(app.client.get("/tags/caf%C3%A9"))["tag"] == "café"
    assert body(app.client.get("/tags/100%25"))["tag"] == "100%"
    with connect(app) as sock:  # sent raw, as curl does
        sock.sendall("GET /tags/café HTTP/1.0\r\n\r\n".encode())
        head, _, data = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and json.loads(data)["tag"] == "café"
    status, _, answer = app.raw("GET", "/tags/caf%E9")  # Latin-1, not UTF-8
    assert (status, answer) == (400, {"error": "tag in the path is not valid UTF-8"})
