"""The key is hidden in every spelling a provider or a library may give it, and nothing
else is garbled: escaped echoes, short keys, URL userinfo, the log processor."""

from __future__ import annotations

import html
import json
import traceback
from urllib.parse import quote, quote_plus

import httpx
import pytest
from structlog.testing import capture_logs

from daemon.errors import ApiError
from daemon.log import Redactor
from daemon.redaction import redact
from daemon.smspartner import SmsPartnerClient
from tests.helpers import API_KEY


def spellings(key: str) -> dict[str, str]:
    """Every encoding of ``key`` a provider's error page or JSON message might echo."""
    return {
        "raw": key,
        "json ascii": json.dumps(key)[1:-1],
        "json slash": json.dumps(key)[1:-1].replace("/", "\\/"),
        "json utf-8 slash": key.replace("/", "\\/"),
        "json uppercase hex": json.dumps(key)[1:-1].replace("\\u00e9", "\\u00E9"),
        "html": html.escape(key),
        "html numeric": "".join(f"&#{ord(c)};" for c in key),
        "html hex slash": html.escape(key).replace("/", "&#x2F;"),
        "html named": html.escape(key).replace("/", "&sol;").replace("é", "&eacute;"),
        "percent": quote(key, safe=""),
        "percent lowercase": quote(key, safe="").lower(),
        "form": quote_plus(key, safe=""),
        "form lowercase": quote_plus(key, safe="").lower(),
    }


SPELLINGS = spellings(API_KEY)


def assert_hidden(text: str) -> None:
    for name, variant in SPELLINGS.items():
        assert variant not in text, f"{name} spelling leaked: {text}"
    assert "k3y-Secret" not in text and "k3y-secret" not in text.lower()


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_of_the_key_is_redacted(spelling: str) -> None:
    text = f"<p>Unknown key '{SPELLINGS[spelling]}', sorry</p>"
    assert redact(text, API_KEY) == "<p>Unknown key '***', sorry</p>"


def test_a_short_key_is_hidden_alone_but_never_inside_words() -> None:
    assert redact("poll.completed in 0.2 s", "e") == "poll.completed in 0.2 s"
    assert redact("key 'abc' refused; abcdef kept", "abc") == "key '***' refused; abcdef kept"


def test_userinfo_is_dropped_from_every_url() -> None:
    text = "GET https://bob:s3cr%40t@api.example.test:8443/v1/x?apiKey=zz and http://h/a@b"
    assert redact(text) == "GET https://api.example.test:8443/v1/x?apiKey=*** and http://h/a@b"


def test_the_log_processor_leaves_event_names_and_field_names_alone() -> None:
    redactor = Redactor(["e", API_KEY])
    event = {
        "event": "poll.completed",
        "error": f"provider said {SPELLINGS['json slash']}",
        "nested": {"detail": [SPELLINGS["html"]]},
    }
    cleaned = redactor(None, "info", event)
    assert cleaned == {
        "event": "poll.completed",
        "error": "provider said ***",
        "nested": {"detail": ["***"]},
    }
    foreign = redactor(
        None, "debug", {"event": f"HTTP Request: GET http://u:p@h/?apiKey={API_KEY}"}
    )
    assert foreign["event"] == "HTTP Request: GET http://h/?apiKey=***"


def _client(response: httpx.Response) -> SmsPartnerClient:
    http = httpx.Client(transport=httpx.MockTransport(lambda request: response))
    return SmsPartnerClient(
        http,
        api_key=API_KEY,
        base_url="https://api.example.test/v1",
        max_retries=1,
        rate_limit_per_second=0,
        sleep=lambda _: None,
    )


def _echoes() -> list[httpx.Response]:
    """Error answers echoing the key in each spelling: JSON messages and error pages."""
    answers = []
    for variant in SPELLINGS.values():
        message = f'{{"success": false, "code": 10, "message": "Unknown key {variant}"}}'
        answers.append(httpx.Response(200, content=message.encode()))
        answers.append(
            httpx.Response(
                403,
                content=f"<html><body>Forbidden: {variant}</body></html>".encode(),
                headers={"Content-Type": "text/html"},
            )
        )
        answers.append(httpx.Response(502, content=f"bad gateway for {variant}".encode()))
    return answers


@pytest.mark.usefixtures("debug_logs")
@pytest.mark.parametrize("response", _echoes())
def test_an_escaped_echo_of_the_key_never_leaks_from_errors_or_logs(
    response: httpx.Response,
) -> None:
    with capture_logs() as logs, pytest.raises(ApiError) as caught:
        _client(response).fetch_tag("t")
    formatted = "".join(traceback.format_exception(caught.value))
    for text in (str(caught.value), formatted, repr(logs)):
        assert_hidden(text)


def test_a_body_we_cannot_use_is_described_not_quoted() -> None:
    page = "<html><body>Nothing to see here</body></html>"
    response = httpx.Response(403, text=page, headers={"Content-Type": "text/html; charset=x"})
    with pytest.raises(ApiError) as caught:
        _client(response).fetch_tag("t")
    message = str(caught.value)
    assert message.endswith(f"HTTP 403: text/html body of {len(page)} bytes")
    assert "Nothing" not in message
