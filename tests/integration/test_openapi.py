"""GET /openapi.json is the truth: valid, complete, and what the server answers matches it.

The full fuzz is .ci/fuzz-http (schemathesis against the real daemon); these tests are
the quick part: the document validates, every route and method it lists is served and
nothing else is, and a few real answers match their documented schemas and headers.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate

from daemon import openapi, store, tracking
from daemon.http import COMMON_ANSWERS, ROUTES, TAG_IN_PATH, HttpServer
from daemon.http_protocol import Reply
from daemon.routing import HTML, Answer, Call, Route
from daemon.status import Report, Status, tag_problem
from tests.integration import test_http as http_tests

App = http_tests.App
make_app, app = http_tests.make_app, http_tests.app  # the fixtures, shared with test_http.py
T0, TOKEN = http_tests.T0, http_tests.TOKEN

#: Methods probed on every documented path (what HTTP defines, and one it does not).
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "BREW")


def served_document(app: App) -> dict[str, Any]:
    response = app.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def concrete(path: str) -> str:
    """A documented path with its parameters filled in."""
    return path.replace("{tag}", "nov-promo")


def assert_matches(document: dict[str, Any], response: httpx.Response, path: str) -> None:
    """``response`` is one the document lists for ``path``: status, content type, body
    schema (formats checked) and headers."""
    method = response.request.method.lower()
    documented = document["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, (method, path, response.status_code)
    answer = documented[str(response.status_code)]
    for header in answer.get("headers", {}):
        if header in ("Retry-After", "Link"):  # only when the server is full / a next page
            continue
        assert header.lower() in response.headers, (path, header)
    if method == "head":
        assert response.content == b""
        return
    [(media, content)] = answer["content"].items()
    assert response.headers["content-type"].split(";")[0] == media
    if media != "application/json":
        return
    schema = {**content["schema"], "components": document["components"]}
    validator = Draft202012Validator(schema, format_checker=FormatChecker())
    errors = [e.message for e in validator.iter_errors(response.json())]
    assert not errors, (method, path, errors)


# --- the document -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_the_document_validates_and_names_the_token_only_when_set(
    make_app: Callable[..., App], token: str | None
) -> None:
    app = make_app(token=token)
    document = served_document(app)

    validate(document)  # openapi-spec-validator: OpenAPI 3.1 and its JSON Schemas
    assert document["openapi"] == "3.1.0"
    writes = [
        operation
        for item in document["paths"].values()
        for method, operation in item.items()
        if method in ("post", "delete")
    ]
    assert len(writes) == 2
    for operation in writes:
        if token:
            assert operation["security"] == [{"bearer": []}]
            assert "401" in operation["responses"]
        else:
            assert "security" not in operation and "401" not in operation["responses"]
    schemes = document["components"].get("securitySchemes", {})
    assert set(schemes) == ({"bearer"} if token else set())


def test_every_route_of_the_table_is_documented_with_its_parameters() -> None:
    document = openapi.document(ROUTES, COMMON_ANSWERS, token_required=True)
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    served = {(r.method, r.path) for r in ROUTES}
    served |= {("HEAD", path) for method, path in served if method == "GET"}
    assert documented == served
    for route in ROUTES:
        in_path = set(re.findall(r"\{(\w+)\}", route.path))
        assert in_path == {p.name for p in route.params if p.where == "path"}, route.path
        for answer in route.answers.values():
            assert answer.schema is None or answer.schema in openapi.SCHEMAS
            assert set(answer.headers) <= set(openapi.HEADERS)


def test_every_documented_method_is_served_and_every_other_gets_405_with_allow(
    make_app: Callable[..., App],
) -> None:
    app = make_app(token=TOKEN)
    document = served_document(app)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path, item in document["paths"].items():
        documented = sorted(method.upper() for method in item)
        for method in METHODS:
            status, headers, _ = raw(app, method, concrete(path), auth)
            if method in documented:
                assert str(status) in item[method.lower()]["responses"], (method, path, status)
            else:
                assert status == 405, (method, path, status)
                assert headers["allow"] == ", ".join(documented)


@pytest.mark.parametrize("path", ["/", "/ui", "/docs", "/openapi", "/tags/a/b", "/healthz/"])
def test_a_path_the_document_does_not_list_is_a_404(app: App, path: str) -> None:
    """Vice versa: nothing is served that the document does not list."""
    listed = served_document(app)["paths"]
    if path in listed:  # a page added to the table since (the status page): documented
        return
    for method in ("GET", "POST", "DELETE"):
        assert raw(app, method, path)[0] == 404


def raw(
    app: App, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request sent as given, whatever its method."""
    conn = http.client.HTTPConnection("127.0.0.1", app.server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# --- answers against their schemas ------------------------------------------------------------


def test_real_answers_match_their_documented_schemas(make_app: Callable[..., App]) -> None:
    app = make_app(token=TOKEN)
    document = served_document(app)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with app.engine.begin() as conn:
        tracking.track_many(conn, [("old", T0, T0 + timedelta(hours=48))], now=T0)
        found = {"+33600000001": Report("+33600000001", Status.DELIVERED, "Delivered", True, T0)}
        store.apply_reports(conn, "old", found, now=T0)
    c = app.client
    checks = [
        (c.get("/healthz"), "/healthz"),
        (c.get("/readyz"), "/readyz"),
        (c.head("/readyz"), "/readyz"),
        (c.get("/metrics"), "/metrics"),
        (c.get("/openapi.json"), "/openapi.json"),
        (c.post("/tags", json={"tag": "nov-promo"}, headers=auth), "/tags"),
        (c.post("/tags", json={"tag": "Nov-Promo-2026-Spring-Sale"}, headers=auth), "/tags"),
        (c.post("/tags", json={"tag": ""}, headers=auth), "/tags"),
        (c.post("/tags", json={"tag": "x"}), "/tags"),  # no token: 401
        (c.post("/tags", content=b"x" * 70_000, headers=auth), "/tags"),  # 413
        (c.get("/tags", params={"limit": 1}), "/tags"),  # with Link
        (c.get("/tags", params={"limit": 0}), "/tags"),
        (c.get("/tags/old"), "/tags/{tag}"),
        (c.get("/tags/nov-promo"), "/tags/{tag}"),
        (c.head("/tags/nov-promo"), "/tags/{tag}"),
        (c.get("/tags/never"), "/tags/{tag}"),
        (c.get("/tags/a%09b"), "/tags/{tag}"),
        (c.delete("/tags/nov-promo", headers=auth), "/tags/{tag}"),
        (c.delete("/tags/never", headers=auth), "/tags/{tag}"),
        (c.delete("/tags/nov-promo"), "/tags/{tag}"),
    ]
    app.clock.advance(seconds=61)  # the loop stalls: the 503s too
    checks += [(c.get("/healthz"), "/healthz"), (c.get("/readyz"), "/readyz")]

    statuses = set()
    for response, path in checks:
        assert_matches(document, response, path)
        statuses.add(response.status_code)
    assert statuses == {200, 201, 400, 401, 404, 413, 503}
    assert checks[10][0].headers["link"]  # the documented Link was there to check


def test_tag_pattern_and_rule_agree_outside_the_documented_gap() -> None:
    """The document's tag schema accepts a string exactly when the daemon does, except for
    unprintable code points the pattern cannot name (which .ci/schemathesis_hooks.py drops
    and the next test covers)."""
    schema = openapi.SCHEMAS["TagName"]
    validator = Draft202012Validator(schema)

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=70))
    def agree(text: str) -> None:
        in_gap = any(not ch.isprintable() and re.match(openapi.TAG_PATTERN, ch) for ch in text)
        if not in_gap:
            assert validator.is_valid(text) == (tag_problem(text) is None), repr(text)

    agree()


@pytest.mark.parametrize(
    "char",
    ["\u200b", "\u00ad", "\ue000", "\U000f0000", "\u0378"],
    ids=["zwsp", "shy", "pua", "spua", "unassigned"],
)
def test_the_gap_is_refused_as_its_description_says(app: App, char: str) -> None:
    """What the pattern lets through but the rule refuses: format, private-use and
    unassigned code points get a 400 naming the rule, as the tag's description says."""
    schema = openapi.SCHEMAS["TagName"]
    assert Draft202012Validator(schema).is_valid("a" + char)
    assert "unassigned" in schema["description"]
    response = app.client.post("/tags", json={"tag": "a" + char})
    assert response.status_code == 400
    assert response.json() == {"error": "tag must contain printable characters only"}


def test_an_html_page_added_to_the_table_is_documented_as_text_html() -> None:
    """How the status page's routes are documented: one entry each, answering HTML."""

    def tag_page(server: HttpServer, call: Call) -> Reply:
        raise AssertionError("only the document is built here")

    page = Route(
        "GET",
        "/ui/tags/{tag}",
        tag_page,
        "A tag's page",
        {200: Answer("The page.", None, HTML), 404: Answer("No such tag.", None, HTML)},
        params=(TAG_IN_PATH,),
    )
    document = openapi.document((*ROUTES, page), COMMON_ANSWERS, token_required=False)

    validate(document)
    item = document["paths"]["/ui/tags/{tag}"]
    assert set(item) == {"get", "head"}
    assert item["get"]["operationId"] == "tagPage"
    for status in ("200", "404"):
        assert item["get"]["responses"][status]["content"] == {
            "text/html": {"schema": {"type": "string"}}
        }
        assert "content" not in item["head"]["responses"][status]
    assert "application/json" in item["get"]["responses"]["503"]["content"]  # the protocol's
