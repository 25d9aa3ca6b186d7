"""Retention: delete rows older than a cutoff, in small batches, one transaction each.

Used by ``smspartner-status prune`` and, when ``SMSPARTNER_PRUNE_EVENTS_DAYS`` or
``SMSPARTNER_PRUNE_RUNS_DAYS`` is set, by a daily job of ``run``. What goes:

* ``delivery_status_events`` observed before the events cutoff;
* ``poll_runs`` finished before the runs cutoff;
* with a statuses cutoff: the ``delivery_statuses`` rows (and all the events) of tags no
  longer polled (completed, expired, untracked) whose window ended before it; the tag's
  ``tracked_tags`` row stays, so re-tracking it or reading its poll history still works;
* ``stop_sms_optouts`` first seen before the opt-outs cutoff — only when one is given:
  an opt-out is what keeps a number from being messaged again.

Each batch is ``DELETE … WHERE id IN (SELECT id … ORDER BY id LIMIT n)`` committed on
its own, over the ids between the previous batch's last one and the last matching id
when the prune began; on SQLite the next batch waits as long as this one held the
write lock. So the daemon's polls never wait
long for a lock (``tests/benchmarks/prune_20m.py``), and an interrupted prune keeps what
it already did. The store functions hold the statements; this module holds
the loop, the plan and the progress reporting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy.engine import Engine

from daemon import store
from daemon.db import write_transaction
from daemon.output import iso
from daemon.settings import Settings

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZE = 5000
#: The least a prune leaves SQLite's write lock free between two batches: more than
#: the longest sleep of a waiting writer's busy handler (100 ms).
SQLITE_PAUSE = 0.15
#: How often a long prune reports its progress on a table.
PROGRESS_EVERY = 5.0


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """Rows older than these go; None leaves that kind of row alone."""

    events: datetime | None = None
    runs: datetime | None = None
    statuses: datetime | None = None
    optouts: datetime | None = None

    @classmethod
    def from_ages(
        cls,
        now: datetime,
        *,
        events: timedelta | None = None,
        runs: timedelta | None = None,
        statuses: timedelta | None = None,
        optouts: timedelta | None = None,
    ) -> Cutoffs:
        """Cutoffs ``now - age`` for each age given."""

        def before(age: timedelta | None) -> datetime | None:
            return None if age is None else now - age

        return cls(before(events), before(runs), before(statuses), before(optouts))

    def __bool__(self) -> bool:
        return any((self.events, self.runs, self.statuses, self.optouts))


@dataclass(frozen=True, slots=True)
class Step:
    """One table to prune: its batch delete, its count, and what it removes."""

    table: str
    what: str
    rows: store.Prunable


def plan(cutoffs: Cutoffs) -> list[Step]:
    """The tables to prune, in order, with the predicates the cutoffs select."""
    steps = []
    if cutoffs.events or cutoffs.statuses:
        events, retired = cutoffs.events, cutoffs.statuses
        what = " or ".join(
            text
            for text, given in (
                (f"observed before {iso(events)}", events),
                (f"of tags retired before {iso(retired)}", retired),
            )
            if given
        )
        steps.append(
            Step(
                "delivery_status_events",
                what,
                store.events_to_prune(events, retired_before=retired),
            )
        )
    if (statuses := cutoffs.statuses) is not None:
        steps.append(
            Step(
                "delivery_statuses",
                f"of tags completed, expired or untracked, window ended before {iso(statuses)}",
                store.statuses_to_prune(statuses),
            )
        )
    if (runs := cutoffs.runs) is not None:
        steps.append(
            Step(
                "poll_runs",
                f"finished before {iso(runs)}",
                store.poll_runs_to_prune(runs),
            )
        )
    if (optouts := cutoffs.optouts) is not None:
        steps.append(
            Step(
                "stop_sms_optouts",
                f"first seen before {iso(optouts)}",
                store.optouts_to_prune(optouts),
            )
        )
    return steps


@dataclass(slots=True)
class TableResult:
    """What a prune did (or, in a dry run, would do) to one table."""

    table: str
    what: str
    rows: int = 0
    batches: int = 0


#: ``progress(result, finished)``: after a table, and every few seconds during one.
Progress = Callable[[TableResult, bool], None]


def prune(
    engine: Engine,
    cutoffs: Cutoffs,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[TableResult]:
    """Delete (or count, with ``dry_run``) every row the cutoffs select.

    Args:
        engine: the database; each batch is its own transaction.
        cutoffs: what to delete.
        batch_size: rows per transaction.
        dry_run: count only, change nothing.
        progress: called per table (and every few seconds during a long one).
        should_stop: checked between batches (the daemon is shutting down).
    """
    results = []
    for step in plan(cutoffs):
        result = TableResult(step.table, step.what)
        results.append(result)
        if dry_run:
            with engine.connect() as conn:
                result.rows = store.count_prunable(conn, step.rows)
        else:
            _delete_all(engine, step, result, batch_size, progress, should_stop)
        if progress is not None:
            progress(result, True)
        if should_stop():
            break
    log.info(
        "retention.pruned",
        dry_run=dry_run,
        rows=sum(r.rows for r in results),
        **{r.table: r.rows for r in results},
    )
    return results


def _delete_all(
    engine: Engine,
    step: Step,
    result: TableResult,
    batch_size: int,
    progress: Progress | None,
    should_stop: Callable[[], bool],
) -> None:
    reported = time.monotonic()
    with engine.connect() as conn:
        upto = store.last_prunable_id(conn, step.rows)
    after = 0
    while after < upto and not should_stop():
        started = time.monotonic()
        with write_transaction(engine) as conn:
            deleted, after = store.delete_batch(conn, step.rows, batch_size, after=after, upto=upto)
        result.rows += deleted
        result.batches += 1
        if deleted < batch_size:
            return
        if engine.dialect.name == "sqlite":
            _make_way(engine, time.monotonic() - started)
        if progress is not None and time.monotonic() - reported >= PROGRESS_EVERY:
            progress(result, False)
            reported = time.monotonic()


def _make_way(engine: Engine, held: float) -> None:
    """On SQLite, between two batches: let other writers in, and checkpoint the WAL.

    SQLite has one writer, and a writer waiting in its busy handler retries only every
    100 ms or so: a prune that began its next batch at once kept a poll waiting 10 s
    (``tests/benchmarks/prune_20m.py``). So the lock stays free for longer than that
    interval, and longer than the batch held it. The passive checkpoint moves the
    deleted pages into the database file here, instead of in a poll's commit.
    """
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    time.sleep(max(held, SQLITE_PAUSE))


def scheduled_prune(
    engine: Engine,
    settings: Settings,
    clock: Callable[[], datetime],
    *,
    should_stop: Callable[[], bool],
) -> Callable[[], None] | None:
    """The daemon's daily job, or None when neither retention setting is set."""
    events, runs = settings.prune_events_days, settings.prune_runs_days
    if events is None and runs is None:
        return None

    def job() -> None:
        cutoffs = Cutoffs.from_ages(
            clock(),
            events=None if events is None else timedelta(days=events),
            runs=None if runs is None else timedelta(days=runs),
        )
        prune(engine, cutoffs, should_stop=should_stop)

    return job
