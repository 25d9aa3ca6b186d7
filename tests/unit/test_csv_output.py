"""The CSV writer (``daemon.output.write_csv``): any text reads back through the csv
module as written, except that a cell a spreadsheet would run as a formula gains one
leading quote; values render as ``--json`` renders them."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from daemon.output import FORMULA_STARTS, write_csv


def read_back(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def export(rows: list[dict[str, object]], columns: tuple[str, ...]) -> str:
    out = io.StringIO(newline="")
    assert write_csv(rows, columns, out) == len(rows)
    return out.getvalue()


@given(st.lists(st.lists(st.text(), min_size=3, max_size=3), max_size=5))
def test_any_text_reads_back_as_written_or_quoted_once(cells: list[list[str]]) -> None:
    columns = ("a", "b", "c")
    rows = [dict(zip(columns, row, strict=True)) for row in cells]
    back = read_back(export(rows, columns))
    assert back[0] == list(columns)
    assert len(back) == 1 + len(cells)
    for written, read in zip(cells, back[1:], strict=True):
        for original, cell in zip(written, read, strict=True):
            if cell != original:
                assert cell == "'" + original
                assert original.startswith(FORMULA_STARTS)
            else:
                plain_number = original[1:].isascii() and original[1:].isdigit()
                assert not original.startswith(FORMULA_STARTS) or plain_number


def test_values_render_as_json_renders_them() -> None:
    paris = timezone(timedelta(hours=1))
    row = {
        "time": datetime(2026, 11, 26, 10, 0, 5, 123456, tzinfo=paris),
        "utc": datetime(2026, 11, 26, 9, 0, tzinfo=UTC),
        "yes": True,
        "no": False,
        "none": None,
        "count": 12,
        "rate": 0.5,
        "decimal": Decimal("0.25"),
        "phone": "+33612345678",
    }
    text = export([row], tuple(row))
    assert text.endswith("\r\n") and text.count("\r\n") == 2  # RFC 4180 line ends
    assert read_back(text)[1] == [
        "2026-11-26T09:00:05Z",
        "2026-11-26T09:00:00Z",
        "true",
        "false",
        "",
        "12",
        "0.5",
        "0.25",
        "+33612345678",
    ]


def test_no_rows_is_the_header_alone() -> None:
    assert export([], ("phone_number", "tag")) == "phone_number,tag\r\n"
