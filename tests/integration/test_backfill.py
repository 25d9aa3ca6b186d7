"""`track --from-file`: a plain list, CSV with sent_at, comments, stdin; every line is
checked first, so one bad line writes nothing."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon import backfill, migrate, queries, tracking
from daemon.db import create_engine, tracked_tags
from daemon.errors import InputError
from tests.helpers import CliResult, run_cli


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")}
    env["SMSPARTNER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'cli.db'}"
    return env


def stored(env: dict[str, str]) -> dict[str, tuple[datetime, datetime, str]]:
    engine = create_engine(env["SMSPARTNER_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    tracked_tags.c.tag,
                    tracked_tags.c.sent_at,
                    tracked_tags.c.window_ends_at,
                    tracked_tags.c.state,
                )
            )
            return {tag: (sent, ends, state) for tag, sent, ends, state in rows}
    except sa.exc.OperationalError:  # no tables: nothing was ever written
        return {}
    finally:
        engine.dispose()


def track_file(tmp_path: Path, env: dict[str, str], text: str, *args: str) -> CliResult:
    path = tmp_path / "tags.txt"
    path.write_text(text, encoding="utf-8")
    return run_cli("track", "--from-file", str(path), *args, env=env)


def test_plain_list_with_blanks_and_comments(tmp_path: Path, env: dict[str, str]) -> None:
    text = "# campaigns of November\nspring\n\n  summer  \n# done\nautumn\nspring\n"
    before = datetime.now(UTC)
    res = track_file(tmp_path, env, text)
    assert res.code == 0, res.err
    assert res.out.strip().endswith("tracking 3 tag(s) from " + str(tmp_path / "tags.txt")
                                    + ": 3 new, 0 re-activated")  # fmt: skip
    assert res.err == ""
    rows = stored(env)
    assert sorted(rows) == ["autumn", "spring", "summer"]
    for sent, ends, state in rows.values():
        assert before <= sent <= datetime.now(UTC)
        assert (ends - sent, state) == (timedelta(hours=48), "active")

    res = track_file(tmp_path, env, "spring\nwinter\n")
    assert "2 tag(s)" in res.out and "1 new, 1 re-activated" in res.out


def test_csv_with_sent_at_optional_per_row(tmp_path: Path, env: dict[str, str]) -> None:
    text = (
        "tag,sent_at\n"
        "# exported from the CRM\n"
        "spring,2026-11-26T09:00:00+01:00\n"
        "summer,\n"
        '"autumn",2026-11-20 10:00\n'
        "winter\n"
    )
    res = track_file(tmp_path, env, text, "--sent-at", "2026-11-01T00:00:00Z")
    assert res.code == 0, res.err
    assert "tracking 4 tag(s)" in res.out
    sent = {tag: row[0] for tag, row in stored(env).items()}
    assert sent == {
        "spring": datetime(2026, 11, 26, 8, tzinfo=UTC),
        "summer": datetime(2026, 11, 1, tzinfo=UTC),  # no sent_at: --sent-at
        "autumn": datetime(2026, 11, 20, 10, tzinfo=UTC),
        "winter": datetime(2026, 11, 1, tzinfo=UTC),
    }


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["spring", "summer sale", "autumn"], "f.csv:2: invalid tag 'summer sale'"),
        (["tag,sent_at", "a,2026-11-26", "b,yesterday"], "f.csv:3: sent_at 'yesterday' is not"),
        (["tag,sent_at", "spring,2026-11-26,x"], "f.csv:2: expected 2 field(s)"),
        (["tag", '"spring'], "f.csv:2: not a CSV line"),
        (["ok", "x" * 65], "f.csv:2: invalid tag 'xxx"),
        (
            ["tag,sent_at", "far,9999-12-31T23:00:00Z"],
            "f.csv:2: sent_at '9999-12-31T23:00:00Z' is too far in the future",
        ),
        (["tag,sent_at", "a,0001-01-01T00:00:00+01:00"], "f.csv:2: sent_at '0001-01-01T00:0"),
    ],
)
def test_a_bad_line_is_named(lines: list[str], message: str) -> None:
    with pytest.raises(InputError) as caught:
        backfill.parse_lines(lines, source="f.csv")
    assert str(caught.value).startswith(message)


def test_a_bad_line_writes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    res = track_file(tmp_path, env, "spring\nsummer\nautumn sale\n")
    assert res.code == 2
    assert res.err == f"error: {tmp_path / 'tags.txt'}:3: invalid tag 'autumn sale': " + (
        "tag must not contain whitespace\n"
    )
    assert stored(env) == {}


def test_a_sent_at_too_far_in_the_future_writes_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    res = track_file(tmp_path, env, "tag,sent_at\nspring,\nfar,9999-12-31T23:00:00Z\n")
    assert res.code == 2
    assert res.err == (
        f"error: {tmp_path / 'tags.txt'}:3: sent_at '9999-12-31T23:00:00Z' is too far in the "
        "future: its report window would end after the year 9999\n"
    )
    assert stored(env) == {}
    res = track_file(tmp_path, env, "spring\n", "--sent-at", "9999-12-31T23:00:00Z")
    assert res.code == 2 and "--sent-at" in res.err and res.err.count("\n") == 1
    assert stored(env) == {}


def test_stdin_and_warnings_once_per_tag_capped(env: dict[str, str]) -> None:
    tags = [f"Campaign-{i}" for i in range(12)] + ["fine", "Campaign-0"]
    res = run_cli("track", "--from-file", "-", env=env, stdin="\n".join(tags) + "\n")
    assert res.code == 0, res.err
    assert "tracking 13 tag(s) from <stdin>: 13 new" in res.out
    warnings = res.err.splitlines()
    assert len(warnings) == 11 and warnings[0].startswith("warning: tag 'Campaign-0':")
    assert warnings[-1] == ("warning: 2 more tag(s) longer than 20 characters or not lowercase")
    assert len(stored(env)) == 13


def test_tag_and_file_together_neither_or_no_tags_are_errors(
    tmp_path: Path, env: dict[str, str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    for args, message in (
        (["spring", "--from-file", "x"], "error: give either TAG or --from-file FILE"),
        ([], "error: TAG is required (or --from-file FILE)"),
        (["--from-file", str(empty)], f"error: --from-file: no tags in {empty}"),
    ):
        res = run_cli("track", *args, env=env)
        assert res.code == 2 and res.err.startswith(message) and res.err.count("\n") == 1


def test_files_without_tags_or_unreadable_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot read .*missing\.txt: No such file"):
        backfill.read_file(str(tmp_path / "missing.txt"))
    assert backfill.parse_lines(["# nothing", "", "  "], source="f") == []


def test_parse_lines_reads_a_bom_and_a_tag_only_header() -> None:
    entries = backfill.parse_lines(["\ufefftag\n", "spring\n", "summer"], source="f.csv")
    assert [(e.tag, e.sent_at, e.line) for e in entries] == [
        ("spring", None, 2),
        ("summer", None, 3),
    ]


def test_track_all_on_both_engines_keeps_the_latest_sent_at(db_url: str) -> None:
    engine = create_engine(db_url)
    migrate.upgrade(engine)
    t0 = datetime(2026, 11, 26, 9, tzinfo=UTC)
    window = timedelta(hours=48)
    try:
        with engine.begin() as conn:
            tracking.track(conn, "old", sent_at=t0, window_ends_at=t0 + window, now=t0)
            tracking.untrack(conn, "old", now=t0)
        lines = ["tag,sent_at", "old,2026-11-27T09:00:00Z", "new", "new,2026-11-20T00:00:00Z"]
        with engine.begin() as conn:
            done = backfill.track_all(
                conn,
                backfill.parse_lines(lines, source="f"),
                default_sent_at=t0,
                window=window,
                now=t0,
            )
        assert (done.tags, done.new) == (2, 1)
        with engine.connect() as conn:
            rows = {r["tag"]: r for r in queries.list_tags(conn)}
        assert rows["old"]["state"] == "active"
        assert rows["old"]["sent_at"] == t0 + timedelta(days=1)  # later: the window moves
        assert rows["new"]["sent_at"] == t0  # the later of its two lines
        assert rows["new"]["window_ends_at"] == t0 + window
    finally:
        engine.dispose()
