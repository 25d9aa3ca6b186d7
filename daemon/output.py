"""How the CLI and the demo print things: aligned tables, JSON, ISO-8601 UTC times.

Tables are a 20-line formatter rather than a library: alignment is all they need, and
the output stays stable for scripts that grep it.

What is printed may come from the provider (phone numbers, statuses) or from whoever
can track a tag, so it is never written to a terminal raw: a table cell or an error line
shows every character that is not printable (C0 and C1 controls such as ESC, DEL,
bidirectional overrides such as U+202E, zero-width and other format characters, line
separators, lone surrogates) as a Python-style escape (``\\x1b``, ``\\u202e``). JSON escapes
every non-ASCII character and every control as ``\\uXXXX``, as the format allows.

CSV is data, not terminal output: no escaping, the csv module's RFC 4180 quoting keeps
any text (quotes, commas, line breaks, controls) intact for a reader. Only a cell that a
spreadsheet would run as a formula is changed (see :func:`csv_text`).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TextIO

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


# --- CSV ------------------------------------------------------------------------------------

#: Columns of ``report TAG --numbers``, as a table and as CSV, in this order.
NUMBER_CSV_COLUMNS = (
    "phone_number",
    "status",
    "provider_status",
    "stop_sms",
    "reported_at",
    "resolved_at",
)

#: Columns of ``optouts --json`` and ``optouts --csv``.
OPTOUT_COLUMNS = ("phone_number", "tag", "reported_at", "first_seen_at")

#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV
#: injection"): ``=``, ``+``, ``-``, ``@``, and tab and carriage return, which some
#: spreadsheets skip before looking for them.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """``text`` as a CSV cell that a spreadsheet will not run as a formula.

    Provider data (``provider_status``, even ``phone_number``) and tags are text anyone
    who sends or tracks can choose: ``=HYPERLINK(…)`` opened in a spreadsheet would run.
    Such a cell gets a leading ``'``, which spreadsheets read as "this is text". A plain
    signed integer (``+33612345678``, ``-5``) is left alone: it is no formula, and every
    phone number in E.164 form starts with ``+``.
    """
    if text.startswith(FORMULA_STARTS):
        rest = text[1:]
        if not (text[0] in "+-" and rest.isascii() and rest.isdigit()):
            return "'" + text
    return text


def csv_value(value: Any) -> str | int | float:
    """One CSV cell: times as in JSON (ISO-8601 UTC with ``Z``), ``true``/``false``,
    an empty cell for null, numbers as Python writes them, text guarded by :func:`csv_text`."""
    if value is None:
        return ""
    if isinstance(value, str):
        return csv_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return iso(value) or ""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, int | float):
        return value
    return csv_text(str(value))


def write_csv(
    rows: Iterable[Mapping[Any, Any]], columns: Sequence[str], out: TextIO | None = None
) -> int:
    """Write a header line, then one line per row, to ``out`` (stdout); return the rows.

    RFC 4180 through the csv module's default dialect: comma-separated, fields quoted
    only when they hold a comma, a quote (doubled) or a line break, lines ending in CRLF.
    Rows are written as ``rows`` yields them, so a streamed query is exported in
    constant memory.
    """
    writer = csv.writer(sys.stdout if out is None else out)
    writer.writerow(columns)
    written = 0
    for row in rows:
        writer.writerow([csv_value(row[c]) for c in columns])
        written += 1
    return written
