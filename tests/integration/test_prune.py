"""Retention on both engines: `prune` deletes exactly the rows older than each cutoff,
in batches, never opt-outs unless asked, nothing in a dry run; the CLI as a user runs
it; and the daily job of `run` when the retention settings are set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from daemon import migrate, queries, retention
from daemon.db import (
    TAG_COUNTS_FROM_STATUSES_SQL,
    UtcDateTime,
    create_engine,
    delivery_status_events,
    delivery_statuses,
    poll_runs,
    stop_sms_optouts,
    tracked_tags,
)
from daemon.settings import load_settings
from tests.helpers import run_cli

NOW = datetime.now(UTC).replace(microsecond=0)

#: tag → (state, days since its window ended)
TAGS = {
    "old-done": ("completed", 100),
    "old-expired": ("expired", 100),
    "old-untracked": ("untracked", 100),
    "old-active": ("active", 100),
    "recent-done": ("completed", 5),
}


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def seed(engine: Engine) -> None:
    """Per tag: 2 numbers, events observed 100 and 1 days ago, runs finished then too;
    an opt-out 200 days old and one a day old."""
    with engine.begin() as conn:
        for i, (tag, (state, ended)) in enumerate(TAGS.items()):
            window_ends = ago(ended)
            conn.execute(
                sa.insert(tracked_tags).values(
                    tag=tag,
                    sent_at=window_ends - timedelta(hours=48),
                    window_ends_at=window_ends,
                    state=state,
                )
            )
            for n in range(2):
                phone = f"+3360000{i}{n}"
                conn.execute(
                    sa.insert(delivery_statuses).values(
                        tag=tag,
                        phone_number=phone,
                        status="delivered",
                        first_seen_at=window_ends,
                        updated_at=window_ends,
                    )
                )
            for days in (100, 1):
                conn.execute(
                    sa.insert(delivery_status_events).values(
                        tag=tag,
                        phone_number=f"+3360000{i}0",
                        new_status="delivered",
                        observed_at=ago(days),
                    )
                )
                conn.execute(
                    sa.insert(poll_runs).values(
                        tag=tag, started_at=ago(days), finished_at=ago(days), outcome="ok"
                    )
                )
        for tag, days in (("old-done", 200), ("recent-done", 1)):
            conn.execute(
                sa.insert(stop_sms_optouts).values(
                    phone_number="+33600000000", tag=tag, first_seen_at=ago(days)
                )
            )


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url)
    migrate.upgrade(eng)
    seed(eng)
    yield eng
    eng.dispose()


def counts(engine: Engine) -> dict[str, int]:
    tables = (tracked_tags, delivery_statuses, delivery_status_events, poll_runs)
    with engine.connect() as conn:
        found = {
            t.name: int(conn.scalar(sa.select(sa.func.count()).select_from(t)) or 0)
            for t in (*tables, stop_sms_optouts)
        }
    return found


def tags_of(engine: Engine, table: sa.Table) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(sa.select(table.c.tag)))


def prune(engine: Engine, **ages: timedelta) -> dict[str, int]:
    results = retention.prune(engine, retention.Cutoffs.from_ages(NOW, **ages))
    return {r.table: r.rows for r in results}


INITIAL = {
    "tracked_tags": 5,
    "delivery_statuses": 10,
    "delivery_status_events": 10,
    "poll_runs": 10,
    "stop_sms_optouts": 2,
}


def test_events_and_runs_older_than_the_cutoff_go_and_nothing_else(engine: Engine) -> None:
    month = timedelta(days=30)
    deleted = prune(engine, events=month, runs=month)
    assert deleted == {"delivery_status_events": 5, "poll_runs": 5}
    assert counts(engine) == {**INITIAL, "delivery_status_events": 5, "poll_runs": 5}
    with engine.connect() as conn:
        oldest_event = conn.scalar(sa.select(sa.func.min(delivery_status_events.c.observed_at)))
        oldest_run = conn.scalar(sa.select(sa.func.min(poll_runs.c.finished_at)))
    assert (oldest_event, oldest_run) == (ago(1), ago(1))
    assert prune(engine, events=month, runs=month) == {"delivery_status_events": 0, "poll_runs": 0}


def test_the_cutoff_is_exact(engine: Engine) -> None:
    # The 100-day-old rows are exactly at a 100-day cutoff: "older than" keeps them.
    assert prune(engine, events=timedelta(days=100)) == {"delivery_status_events": 0}
    assert prune(engine, events=timedelta(days=99)) == {"delivery_status_events": 5}


def test_statuses_of_retired_tags_go_with_all_their_events(engine: Engine) -> None:
    deleted = prune(engine, statuses=timedelta(days=30))
    assert deleted == {"delivery_status_events": 6, "delivery_statuses": 6}
    # Active tags and tags whose window ended recently keep everything; every tag stays
    # listed, and opt-outs and poll runs are untouched.
    assert tags_of(engine, delivery_statuses) == ["old-active"] * 2 + ["recent-done"] * 2
    assert tags_of(engine, delivery_status_events) == ["old-active"] * 2 + ["recent-done"] * 2
    assert counts(engine) == {**INITIAL, "delivery_statuses": 4, "delivery_status_events": 4}


def test_a_tags_summary_outlives_the_pruning_of_its_numbers(engine: Engine) -> None:
    now = sa.bindparam("now", NOW, type_=UtcDateTime())
    with engine.begin() as conn:  # the counts the polls would have kept
        conn.execute(sa.text(TAG_COUNTS_FROM_STATUSES_SQL).bindparams(now))
        before = {r["tag"]: r["total"] for r in queries.tag_summary(conn)}
    assert before == dict.fromkeys(TAGS, 2)
    prune(engine, statuses=timedelta(days=30))
    with engine.connect() as conn:
        assert {r["tag"]: r["total"] for r in queries.tag_summary(conn)} == before
        assert queries.numbers(conn, "old-done") == []


def test_opt_outs_go_only_with_their_own_option(engine: Engine) -> None:
    year = timedelta(days=1)
    prune(engine, events=year, runs=year, statuses=year)
    assert counts(engine)["stop_sms_optouts"] == 2
    assert prune(engine, optouts=timedelta(days=150)) == {"stop_sms_optouts": 1}
    assert tags_of(engine, stop_sms_optouts) == ["recent-done"]


def test_small_batches_still_delete_everything(engine: Engine) -> None:
    cutoffs = retention.Cutoffs.from_ages(
        NOW, events=timedelta(hours=1), runs=timedelta(hours=1), statuses=timedelta(hours=1)
    )
    results = retention.prune(engine, cutoffs, batch_size=2)
    by_table = {r.table: (r.rows, r.batches) for r in results}
    # 8 events of retired tags + the old-active tag's 2: 5 batches of 2, and no empty
    # batch after them (the last matching id, read before the first batch, ends it).
    assert by_table == {
        "delivery_status_events": (10, 5),
        "delivery_statuses": (8, 4),
        "poll_runs": (10, 5),
    }
    assert counts(engine) == {
        **INITIAL,
        "delivery_statuses": 2,
        "delivery_status_events": 0,
        "poll_runs": 0,
    }


def test_dry_run_counts_exactly_and_changes_nothing(engine: Engine) -> None:
    cutoffs = retention.Cutoffs.from_ages(
        NOW, events=timedelta(days=30), runs=timedelta(days=30), statuses=timedelta(days=30)
    )
    counted = retention.prune(engine, cutoffs, dry_run=True)
    assert counts(engine) == INITIAL
    done = retention.prune(engine, cutoffs)
    assert [(r.table, r.rows) for r in counted] == [(r.table, r.rows) for r in done]
    # Overlapping rules (old events of retired tags) are counted once.
    assert dict((r.table, r.rows) for r in done)["delivery_status_events"] == 8


def test_stopping_between_batches_keeps_what_was_done(engine: Engine) -> None:
    calls = iter(range(100))
    cutoffs = retention.Cutoffs.from_ages(NOW, events=timedelta(days=30))
    results = retention.prune(engine, cutoffs, batch_size=2, should_stop=lambda: next(calls) >= 2)
    assert [(r.rows, r.batches) for r in results] == [(4, 2)]
    assert counts(engine)["delivery_status_events"] == 6


# --- the CLI --------------------------------------------------------------------------


def env_for(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSPARTNER_")}
    env.update(SMSPARTNER_DATABASE_URL=url, SMSPARTNER_LOG_LEVEL="warning")
    return env


def test_cli_prunes_prints_per_table_and_a_total(engine: Engine, db_url: str) -> None:
    env = env_for(db_url)
    res = run_cli(
        "prune", "--events-older-than", "30d", "--runs-older-than", "720h", "--dry-run", env=env
    )
    assert res.code == 0, res.err
    assert "delivery_status_events: would delete 5 row(s) observed before" in res.out
    assert "poll_runs: would delete 5 row(s) finished before" in res.out
    assert "dry run: 10 row(s) would be deleted; nothing was changed" in res.out
    assert counts(engine) == INITIAL

    res = run_cli(
        "prune", "--events-older-than", "30d", "--runs-older-than", "30d", "--batch-size", "2",
        env=env,
    )  # fmt: skip
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].startswith("delivery_status_events: deleted 5 row(s) observed before")
    assert lines[1].startswith("poll_runs: deleted 5 row(s) finished before")
    assert lines[2].startswith("pruned 10 row(s) in ")
    assert res.err == ""
    assert counts(engine) == {**INITIAL, "delivery_status_events": 5, "poll_runs": 5}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--events-older-than", "90 days"], "--events-older-than"),
        (["--runs-older-than", "0h"], "--runs-older-than"),
        (["--statuses-older-than", "-3d"], "--statuses-older-than"),
        (["--events-older-than", "1d", "--batch-size", "0"], "--batch-size"),
        ([], "--events-older-than"),
    ],
)
def test_cli_bad_options_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], named: str
) -> None:
    res = run_cli("prune", *args, env=env_for(f"sqlite:///{tmp_path / 'x.db'}"))
    assert res.code == 2
    assert res.out == ""
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert "error:" in res.err and named in res.err
    assert "Traceback" not in res.err


# --- the daily job of `run` -------------------------------------------------------------


def test_retention_settings_blank_means_never_and_bad_values_are_named() -> None:
    settings = load_settings({}, prune_events_days="", prune_runs_days="30")
    assert (settings.prune_events_days, settings.prune_runs_days) == (None, 30.0)
    with pytest.raises(Exception, match="SMSPARTNER_PRUNE_EVENTS_DAYS"):
        load_settings({}, prune_events_days="0")


def test_run_prunes_at_start_when_retention_is_set(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'daemon.db'}"
    eng = create_engine(url)
    migrate.upgrade(eng)
    seed(eng)
    with eng.begin() as conn:  # nothing to poll: the daemon only prunes
        conn.execute(sa.update(tracked_tags).values(state="completed"))
    env = {
        **env_for(url),
        "SMSPARTNER_API_KEY": "unused-key",
        "SMSPARTNER_BASE_URL": "http://127.0.0.1:9/v1",
        "SMSPARTNER_HTTP_PORT": "0",
        "SMSPARTNER_LOG_LEVEL": "info",
        "SMSPARTNER_LOG_FORMAT": "json",
        "SMSPARTNER_PRUNE_EVENTS_DAYS": "30",
        "SMSPARTNER_PRUNE_RUNS_DAYS": "30",
    }
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while counts(eng)["poll_runs"] != 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counts(eng) == {**INITIAL, "delivery_status_events": 5, "poll_runs": 5}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        log.close()
        eng.dispose()
    text = (tmp_path / "run.log").read_text()
    assert '"event": "retention.pruned"' in text and "Traceback" not in text
