"""Reading items tolerantly: what cannot be stored is skipped with a warning, never the
page, and nothing a provider sends makes the parser raise."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from daemon.responses import Envelope, ItemParser, phone_problem, text_problem


@pytest.mark.parametrize(
    ("phone", "problem"),
    [
        ("+33612345678", None),
        ("33612345678", None),
        ("-1", None),  # odd but harmless: stored as sent
        ("x" * 32, None),
        ("", "empty"),
        ("x" * 33, "longer than 32"),
        ("9" * 5_000_000, "longer than 32"),
        ("+336\x001234", "printable"),
        ("+336\ud800", "printable"),
        ("\x1b[2J+336", "printable"),
        ("+336\u202e1234", "printable"),
        ("+33 6 12", "printable"),
        ("+33\u00a0612", "printable"),
    ],
)
def test_a_phone_number_is_1_to_32_printable_characters_without_spaces(
    phone: str, problem: str | None
) -> None:
    found = phone_problem(phone)
    assert found is None if problem is None else problem in (found or "")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("Delivered", None), ("Envoyé\n", None), ("a\x00b", "NUL"), ("\ud800", "surrogate")],
)
def test_provider_text_must_be_storable(text: str, problem: str | None) -> None:
    found = text_problem(text)
    assert found is None if problem is None else problem in (found or "")


def deep(levels: int) -> Any:
    """A list nested ``levels`` deep, as orjson reads it (up to 1,024 levels)."""
    return orjson.loads(b"[" * levels + b"]" * levels)


def test_unstorable_items_are_skipped_one_by_one_and_the_rest_kept() -> None:
    items = [
        {"phoneNumber": "+331", "status": "\ud800"},
        {"phoneNumber": "+332", "status": "De\x00livered"},
        {"phoneNumber": 10**40, "status": "Delivered"},
        {"phoneNumber": "+333", "status": "Delivered", "stopSMS": deep(1020), "date": deep(1020)},
        {"phoneNumber": "+334", "status": "\ud800"},  # the cached verdict: skipped too
        {"phoneNumber": 33612345678, "status": "Waiting"},
    ]
    parser = ItemParser("t")
    with capture_logs() as logs:
        reports = parser.parse_page(items, 1)
    assert [r.phone_number for r in reports] == ["+333", "33612345678"]
    assert parser.skipped == 4 and parser.seen == {"+333", "33612345678"}
    reasons = [e["reason"] for e in logs if e["event"] == "api.item_skipped"]
    assert reasons == [
        "not valid Unicode (lone surrogate)",
        "contains NUL",
        "over 32 digits",
        "not valid Unicode (lone surrogate)",
    ]
    coerced = [e for e in logs if e["event"] == "api.item_coerced"]
    assert [e["field"] for e in coerced] == ["stopSMS", "date"]
    assert all(len(e["value"]) <= 40 for e in coerced)


def test_an_error_message_of_any_shape_becomes_text() -> None:
    too_deep = deep(1020)  # json.dumps gives up before this depth
    envelope = Envelope.model_validate({"success": False, "code": 99, "message": too_deep})
    assert envelope.message == "<list>"
    assert Envelope.model_validate({"message": {"a": 1}}).message == '{"a": 1}'
