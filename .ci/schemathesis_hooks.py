"""schemathesis hooks for .ci/fuzz-http: drop generated requests the document cannot judge.

Two rules of the daemon are not expressible in a portable JSON Schema, and the document
states them in words instead:

- a tag's ``pattern`` (``daemon.openapi.TAG_PATTERN``) refuses whitespace and control
  characters, but the daemon refuses every unprintable code point: format (U+200B…),
  private-use and unassigned ones too, which a portable regular expression cannot name;
- ``sent_at`` may be at most a day ahead of the daemon's clock (a bound that moves), and
  early enough for its window to end by the year 9999.

A request whose tag or ``sent_at`` falls in that gap is neither valid nor invalid by the
document, so schemathesis would report whichever answer it got. Only those requests are
dropped (in both generation modes); everything else is sent as generated. pytest covers
the gap itself (tests/integration/test_openapi.py).

One more is dropped for a reason of schemathesis' own: it percent-decodes a path
parameter before encoding it, so a tag created with an escape in it (``%41``) could not be
followed by an OpenAPI link to ``/tags/{tag}`` (``A`` would be asked for). Such tags are
not generated for ``POST /tags``. (A path parameter cannot be sorted the same way: some
reach the hooks encoded already.)
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import schemathesis

from daemon.openapi import TAG_PATTERN
from daemon.status import parse_sent_at

_ALLOWED = re.compile(TAG_PATTERN)
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
#: Less than the daemon's day, so that clocks read a moment apart agree.
_AHEAD = timedelta(hours=23)


def _unclassifiable_tag(value: object) -> bool:
    """A tag with a code point the pattern allows but the daemon refuses as unprintable."""
    return isinstance(value, str) and any(
        not ch.isprintable() and _ALLOWED.match(ch) for ch in value
    )


def _unclassifiable_sent_at(value: object) -> bool:
    """A ``sent_at`` the daemon refuses for its place in time rather than its form."""
    if not isinstance(value, str):
        return False
    try:
        sent_at = parse_sent_at(value)
    except ValueError as exc:
        return "not an ISO-8601" not in str(exc)  # outside the calendar in UTC, or too late
    return sent_at > datetime.now(UTC) + _AHEAD


def _escaped(value: object) -> bool:
    """A string schemathesis would percent-decode before sending it in a path."""
    return isinstance(value, str) and _ESCAPE.search(value) is not None


@schemathesis.hook
def filter_case(ctx: Any, case: Any) -> bool:
    """Keep the case unless its tag or ``sent_at`` is one the document cannot judge.

    The path's tag is seen here percent-encoded already (hence ``unquote``)."""
    path_tag = (case.path_parameters or {}).get("tag")
    body = case.body if isinstance(case.body, dict) else {}
    return not (
        (isinstance(path_tag, str) and _unclassifiable_tag(unquote(path_tag)))
        or _unclassifiable_tag(body.get("tag"))
        or _escaped(body.get("tag"))
        or _unclassifiable_sent_at(body.get("sent_at"))
    )
