"""How the CLI and the demo print things: aligned tables, JSON, ISO-8601 UTC times.

Tables are a 20-line formatter rather than a library: alignment is all they need, and
the output stays stable for scripts that grep it.

What is printed may come from the provider (phone numbers, statuses) or from whoever
can track a tag, so it is never written to a terminal raw: a table cell or an error line
shows every character that is not printable (C0 and C1 controls such as ESC, DEL,
bidirectional overrides such as U+202E, zero-width and other format characters, line
separators, lone surrogates) as a Python-style escape (``\\x1b``, ``\\u202e``). JSON escapes
every non-ASCII character and every control as ``\\uXXXX``, as the format allows.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

#: Columns of `tags --json` (lease columns are the scheduler's business).
TAG_COLUMNS = (
    "tag",
    "state",
    "sent_at",
    "window_ends_at",
    "next_poll_at",
    "last_success_at",
    "poll_count",
    "consecutive_failures",
    "last_error",
)

#: Columns of the `tag_summary` view, in the order `report` prints them.
SUMMARY_COLUMNS = (
    "tag",
    "state",
    "total",
    "delivered",
    "not_delivered",
    "failed",
    "waiting",
    "unknown",
    "expired",
    "stop_sms",
    "delivery_rate",
    "sent_at",
    "window_ends_at",
    "last_polled_at",
)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def plain(value: Any) -> Any:
    """A JSON-ready value: datetimes as ISO-8601 UTC with ``Z``, decimals as floats."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return float(value)
    return value


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table; numbers right-aligned."""
    if not rows:
        return "(none)"
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), int | float) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def cell(value: Any) -> str:
    """One table cell as text, safe for a terminal (see :func:`safe_text`)."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return iso(value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1%}" if value <= 1 else f"{value:.1f}"
    return safe_text(str(value))


def safe_text(text: str) -> str:
    """``text`` with every non-printable character escaped, so that it cannot move the
    cursor, clear the screen, retitle the window or reorder what follows it.

    ``str.isprintable`` is the rule: it is false for controls (Cc), format characters
    such as the bidi overrides (Cf), surrogates (Cs), separators other than the space
    (Zl, Zp, Zs) and unassigned code points.
    """
    if text.isprintable():  # the usual case, in C
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def json_text(data: Any) -> str:
    """``data`` as indented JSON in which every character is printable ASCII: with
    ``ensure_ascii`` every control (DEL included) and every non-ASCII character (bidi
    overrides, C1 controls, lone surrogates) is a ``\\uXXXX`` escape, which any JSON
    reader turns back into the same text."""
    return json.dumps(data, indent=2, default=plain, ensure_ascii=True)


def print_json(data: Any) -> None:
    print(json_text(data))


def print_error(message: str) -> None:
    """Print one ``error: …`` line on stderr, however many lines ``message`` spans.

    Driver messages can span lines (psycopg's "…refused\n\tIs the server running…");
    scripts, ``journalctl`` and log collectors expect one line per error. What is left
    that a terminal would act on is escaped (:func:`safe_text`).
    """
    print("error: " + safe_text(" ".join(message.split())), file=sys.stderr)
