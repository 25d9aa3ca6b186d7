"""CSV exports (issue 20): ``report TAG --numbers --csv``, ``optouts --csv``, ``tags --csv``.

Every test reads what the CLI printed back through Python's ``csv`` module, as a
spreadsheet or a script would. Rows are written straight into the tables (the export
reads; how rows got there is the poller's business, tested elsewhere).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from daemon import migrate
from daemon.db import (
    create_engine,
    delivery_statuses,
    stop_sms_optouts,
    tracked_tags,
)
from tests.helpers import assert_clean, fill_numbers, peak_rss, run_cli

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
NUMBER_HEADER = [
    "phone_number",
    "status",
    "provider_status",
    "stop_sms",
    "reported_at",
    "resolved_at",
]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database (SQLite file or PostgreSQL) to write rows into."""
    eng = create_engine(db_url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    """The CLI's environment on that database (no API key: exports need none)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")}
    return {**base, "SMSPARTNER_DATABASE_URL": db_url, "SMSPARTNER_LOG_FORMAT": "json"}


def track(engine: Engine, tag: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(tracked_tags),
            {"tag": tag, "sent_at": NOW, "window_ends_at": NOW + timedelta(hours=48)},
        )


def add_number(engine: Engine, tag: str, phone: str, **values: Any) -> None:
    row = {
        "tag": tag,
        "phone_number": phone,
        "status": "delivered",
        "provider_status": "Delivered",
        "stop_sms": False,
        "reported_at": NOW,
        "first_seen_at": NOW,
        "resolved_at": NOW,
        "updated_at": NOW,
    }
    with engine.begin() as conn:
        conn.execute(sa.insert(delivery_statuses), {**row, **values})


def fill(engine: Engine, tag: str, count: int) -> None:
    with engine.begin() as conn:
        fill_numbers(conn, tag, count, NOW)


def read_csv(text: str) -> list[list[str]]:
    """Rows as a CSV reader sees them (``newline=""``, as the csv module asks)."""
    return list(csv.reader(io.StringIO(text, newline="")))


# --- report TAG --numbers --csv --------------------------------------------------------------


def test_a_100000_number_tag_exports_and_reads_back(engine: Engine, env: dict[str, str]) -> None:
    track(engine, "big")
    fill(engine, "big", 100_000)
    started = time.monotonic()
    res = run_cli("report", "big", "--numbers", "--csv", env=env)
    elapsed = time.monotonic() - started
    assert res.code == 0, res.err
    assert res.err == ""
    rows = read_csv(res.out)
    assert rows[0] == NUMBER_HEADER
    assert len(rows) == 1 + 100_000
    assert all(len(r) == 6 for r in rows)
    assert rows[1] == ["+33610000000", "waiting", "Waiting", "true", "2026-11-26T12:00:00Z", ""]
    assert rows[2] == [
        "+33610000001",
        "delivered",
        "Delivered",
        "false",
        "2026-11-26T12:00:00Z",
        "2026-11-26T12:00:00Z",
    ]
    assert rows[-1][0] == "+33610099999"
    assert len({r[0] for r in rows[1:]}) == 100_000  # each number once
    assert sum(r[3] == "true" for r in rows[1:]) == 1_000
    assert res.out.endswith("\r\n") and res.out.count("\r\n") == 100_001  # RFC 4180 lines
    assert elapsed < 30, f"exporting 100,000 numbers took {elapsed:.1f} s"


def test_the_csv_agrees_with_json(engine: Engine, env: dict[str, str]) -> None:
    track(engine, "spring")
    add_number(engine, "spring", "+33600000001", stop_sms=True)
    add_number(
        engine,
        "spring",
        "+33600000002",
        status="unknown",
        provider_status="Queued",
        reported_at=None,
        resolved_at=None,
    )
    as_json = json.loads(run_cli("report", "spring", "--numbers", "--json", env=env).out)
    rows = read_csv(run_cli("report", "spring", "--numbers", "--csv", env=env).out)
    rendered = {True: "true", False: "false", None: ""}
    expected = [
        [rendered.get(n[c], n[c]) if not isinstance(n[c], str) else n[c] for c in NUMBER_HEADER]
        for n in as_json["numbers"]
    ]
    assert rows == [NUMBER_HEADER, *expected]
    assert rows[2] == ["+33600000002", "unknown", "Queued", "false", "", ""]


def test_any_text_survives_the_csv_unescaped(engine: Engine, env: dict[str, str]) -> None:
    """Quotes, commas, line breaks and what a terminal table escapes come back exactly:
    CSV is data, the table's terminal escaping is not applied to it."""
    texts = [
        'said "delivered", twice',
        "line one\nline two\r\nline three\rend",
        "\x1b[31mred\x1b[0m",
        "right\u202eto left",
        "zero\u200bwidth, é, 日本",
        " padded ",
    ]
    track(engine, "odd")
    for i, text in enumerate(texts):
        add_number(engine, "odd", f"+3360000000{i}", status="unknown", provider_status=text)
    res = run_cli("report", "odd", "--numbers", "--csv", env=env)
    assert res.code == 0, res.err
    rows = read_csv(res.out)
    assert [r[2] for r in rows[1:]] == texts
    assert "\\x1b" not in res.out and "\\u202e" not in res.out


@pytest.mark.parametrize(
    ("stored", "exported"),
    [
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
        ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("+33612345678", "+33612345678"),  # a phone number: a plain number, not a formula
        ("-5", "-5"),
        ("a=b", "a=b"),
    ],
)
def test_a_cell_a_spreadsheet_would_run_gets_a_quote(
    stored: str, exported: str, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")},
        "SMSPARTNER_DATABASE_URL": f"sqlite:///{tmp_path / 'f.db'}",
    }
    engine = create_engine(env["SMSPARTNER_DATABASE_URL"])
    try:
        migrate.upgrade(engine)
        track(engine, "f")
        add_number(engine, "f", stored, provider_status=stored)
        with engine.begin() as conn:
            conn.execute(
                sa.insert(stop_sms_optouts),
                {"phone_number": stored, "tag": "f", "reported_at": NOW, "first_seen_at": NOW},
            )
    finally:
        engine.dispose()
    numbers = read_csv(run_cli("report", "f", "--numbers", "--csv", env=env).out)
    assert numbers[1][0] == exported  # phone_number
    assert numbers[1][2] == exported  # provider_status
    optouts = read_csv(run_cli("optouts", "--csv", env=env).out)
    assert optouts[1][0] == exported


def test_a_formula_tag_gets_a_quote(env: dict[str, str], engine: Engine) -> None:
    track(engine, "=1+1")
    rows = read_csv(run_cli("tags", "--csv", env=env).out)
    assert rows[1][0] == "'=1+1"
    summary = read_csv(run_cli("report", "=1+1", "--csv", env=env).out)
    assert summary[1][0] == "'=1+1"


# --- report TAG --csv, optouts --csv, tags --csv ----------------------------------------------


def test_report_csv_without_numbers_is_the_summary_row(engine: Engine, env: dict[str, str]) -> None:
    track(engine, "spring")
    res = run_cli("report", "spring", "--csv", env=env)
    assert res.code == 0, res.err
    summary = json.loads(run_cli("report", "spring", "--json", env=env).out)["summary"]
    header, row = read_csv(res.out)
    assert header == list(summary)
    assert dict(zip(header, row, strict=True)) == {
        k: "" if v is None else str(v) for k, v in summary.items()
    }


def test_optouts_and_tags_csv_have_the_columns_and_values_of_json(
    engine: Engine, env: dict[str, str]
) -> None:
    track(engine, "spring")
    track(engine, "autumn")
    with engine.begin() as conn:
        conn.execute(
            sa.insert(stop_sms_optouts),
            [
                {"phone_number": "+33600000001", "tag": "spring", "reported_at": NOW,
                 "first_seen_at": NOW},
                {"phone_number": "+33600000002", "tag": "autumn", "reported_at": None,
                 "first_seen_at": NOW + timedelta(minutes=1)},
            ],
        )  # fmt: skip
    for verb in ("optouts", "tags"):
        as_json = json.loads(run_cli(verb, "--json", env=env).out)
        res = run_cli(verb, "--csv", env=env)
        assert res.code == 0, res.err
        header, *rows = read_csv(res.out)
        assert len(as_json) == 2 and header == list(as_json[0])
        assert rows == [["" if v is None else str(v) for v in item.values()] for item in as_json]


def test_an_empty_listing_is_the_header_alone(engine: Engine, env: dict[str, str]) -> None:
    track(engine, "empty")
    assert read_csv(run_cli("report", "empty", "--numbers", "--csv", env=env).out) == [
        NUMBER_HEADER
    ]
    assert read_csv(run_cli("optouts", "--csv", env=env).out) == [
        ["phone_number", "tag", "reported_at", "first_seen_at"]
    ]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["report", "spring", "--numbers"], ["report", "spring"], ["optouts"], ["tags"]],
    ids=["report-numbers", "report", "optouts", "tags"],
)
def test_csv_with_json_is_refused_in_one_line(
    argv: list[str], engine: Engine, env: dict[str, str]
) -> None:
    track(engine, "spring")
    res = run_cli(*argv, "--csv", "--json", env=env)
    assert res.code == 2
    assert res.out == ""
    assert res.err.count("\n") == 1 and "--csv" in res.err and "--json" in res.err
    assert_clean(res.err)


def test_csv_of_an_untracked_tag_is_an_error(engine: Engine, env: dict[str, str]) -> None:
    res = run_cli("report", "never", "--numbers", "--csv", env=env)
    assert res.code == 2
    assert res.out == ""
    assert res.err == "error: tag 'never' is not tracked\n"


def test_help_mentions_csv() -> None:
    for verb in ("report", "optouts", "tags"):
        res = run_cli(verb, "--help", env={})
        assert res.code == 0 and "--csv" in res.out and "RFC 4180" in res.out


def test_the_export_streams_in_constant_memory(tmp_path: Path) -> None:
    """The whole command as a process (its memory is the subject): exporting 100,000
    numbers costs about what printing the tag's summary costs, not a copy of the tag.

    Loading every row first (as ``--json`` does) costs ~240 MB over the summary; the
    streamed export ~17 MB, SQLite's page cache (16 MiB per connection).
    """
    url = f"sqlite:///{tmp_path / 'big.db'}"
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
        track(engine, "big")
        fill(engine, "big", 100_000)
    finally:
        engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")}
    env.update(SMSPARTNER_DATABASE_URL=url, SMSPARTNER_LOG_FORMAT="json")
    cli = [sys.executable, "-m", "daemon", "report", "big"]
    summary = peak_rss(cli, env)
    export = peak_rss([*cli, "--numbers", "--csv"], env)
    assert export.lines == 100_001
    assert export.rss_mb < 100, f"peak RSS {export.rss_mb:.0f} MB"
    assert export.rss_mb - summary.rss_mb < 40, (summary, export)
