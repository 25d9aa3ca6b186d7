"""What keeps a large first poll through the CLI cheap, checked structurally rather than
timed (the timings are tests/benchmarks/poll_100k.py's): the collector stays off during
a short verb, and the bulk statements are SQLAlchemy's own SQL without its compiling."""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from daemon import sql, store
from daemon.db import create_engine, delivery_status_events, metadata
from daemon.diff import EVENT_KEYS, STATUS_KEYS
from daemon.simulator import Simulator
from tests.helpers import run_cli
from tests.integration.conftest import NOW, Rig


@pytest.fixture
def collections_in_polls() -> Iterator[list[int]]:
    """The generations the cyclic collector collects while a poll runs (the poller's
    code is on a thread's stack: the simulator's threads allocate too)."""
    seen: list[int] = []
    poller = os.path.join("daemon", "poller.py")

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and any(
            frame.f_code.co_filename.endswith(poller)
            for top in sys._current_frames().values()
            for frame, _ in traceback.walk_stack(top)
        ):
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)


def test_a_large_poll_command_runs_without_the_collector_and_gives_it_back(
    cli_env: dict[str, str], simulator: Simulator, collections_in_polls: list[int]
) -> None:
    # 60,000 numbers keep well over the collector's threshold of new objects alive.
    simulator.add_tag("big", 60_000, sent_at=simulator.now() - timedelta(hours=1), page_size=5000)
    assert gc.isenabled()
    res = run_cli("poll", "big", env=cli_env)
    assert res.code == 0, res.err
    assert "60000 numbers seen, 60000 changed" in res.out
    assert collections_in_polls == []  # nothing rescanned the poll's reports and rows
    assert gc.isenabled()  # an in-process caller gets its collector back


def test_the_collector_comes_back_after_a_failing_verb(cli_env: dict[str, str]) -> None:
    res = run_cli("report", "never-tracked", env=cli_env)
    assert res.code == 2 and "not tracked" in res.err
    assert gc.isenabled()


@pytest.mark.parametrize("rows", [1, 2, 100])
def test_bulk_statements_are_the_sql_sqlalchemy_compiles(rows: int) -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        upsert = functools.partial(store._upsert_statuses, conn, None)
        for name, build, keys in (
            ("test_upsert", upsert, STATUS_KEYS),
            ("test_events", store._insert_events, EVENT_KEYS),
        ):
            text, order = sql._values_sql(conn, name, build, keys, rows)
            values = [{k: sa.bindparam(f"{k}_{i}") for k in keys} for i in range(rows)]
            expected = build(values).compile(dialect=conn.dialect)
            assert text == str(expected)
            placeholders = [f"{k}_{i}" for i in range(rows) for k in keys]
            in_order = [placeholders[i] for i in order] if order else placeholders
            assert in_order == list(expected.positiontup)
    engine.dispose()


def test_the_entry_point_leaves_its_imports_to_the_process_exit(
    cli_env: dict[str, str],
) -> None:
    # The process's own command freezes what it holds, so its exit scans none of it;
    # an in-process caller (a test, an embedding program) keeps its collector as it was.
    script = (
        "import gc, sys\n"
        "from daemon.cli import main\n"
        "sys.argv = ['smspartner-status', 'tags']\n"
        "code = main()\n"
        "print(code, gc.get_freeze_count() > 10_000, gc.isenabled())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=cli_env, capture_output=True, text=True, check=False
    )
    assert done.stdout.split()[-3:] == ["0", "True", "True"], done.stderr
    assert run_cli("tags", env=cli_env).code == 0
    assert gc.get_freeze_count() == 0


def test_a_new_tag_next_to_stored_ones_gets_one_first_sighting_per_number(
    rig: Callable[..., Rig],
) -> None:
    # The events of a tag's first poll are copied from the rows it inserted (on SQLite,
    # those after the last id stored before it): none of another tag's, none twice.
    r = rig()
    for tag, numbers in (("older", 700), ("newer", 1300)):
        r.track(tag)
        r.sim.add_tag(tag, numbers, sent_at=NOW - timedelta(hours=1), page_size=500)
        assert r.poller.poll(tag).events == numbers
        r.clock.now += timedelta(minutes=1)
    with r.engine.connect() as conn:
        e = delivery_status_events.c
        counted = conn.execute(
            sa.select(e.tag, sa.func.count(), sa.func.count(sa.distinct(e.phone_number)))
            .where(e.old_status.is_(None))
            .group_by(e.tag)
            .order_by(e.tag)
        ).all()
    assert [tuple(row) for row in counted] == [("newer", 1300, 1300), ("older", 700, 700)]
    assert r.count(delivery_status_events) == 2000


def test_a_statement_of_another_shape_is_compiled_whole() -> None:
    # A VALUES row with a constant in it is not a plain "(?, …)" group to repeat:
    # SQLAlchemy then compiles every row, and the values still land in their columns.
    keys = [k for k in EVENT_KEYS if k != "old_status"]

    def build(values: list[dict[str, Any]]) -> Any:
        return store._insert_events([{**row, "old_status": sa.null()} for row in values])

    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    with engine.begin() as conn:
        text, _ = sql._values_sql(conn, "test_other_shape", build, keys, 3)
        expected = build([{k: sa.bindparam(f"{k}_{i}") for k in keys} for i in range(3)])
        assert text == str(expected.compile(dialect=conn.dialect)) and "NULL" in text
        rows = [
            ("t", f"+33{i:09d}", "delivered", None, "2026-11-26T08:00:00.000000Z")
            for i in range(102)
        ]
        sql.bulk(conn, "test_other_shape", build, keys, [v for row in rows for v in row])
        e = delivery_status_events.c
        stored = conn.execute(
            sa.select(e.tag, e.phone_number, e.old_status, e.new_status, e.observed_at).order_by(
                e.id
            )
        ).all()
    assert [(t, p, n) for t, p, o, n, _ in stored] == [(t, p, n) for t, p, n, _, _ in rows]
    assert {o for _, _, o, _, _ in stored} == {None}
    engine.dispose()
