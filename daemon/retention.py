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
long for a lock, and an interrupted prune keeps what it already did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from daemon.db import (
    delivery_status_events,
    delivery_statuses,
    poll_runs,
    stop_sms_optouts,
    tracked_tags,
    write_transaction,
)
from daemon.output import iso
from daemon.settings import Settings
from daemon.status import TagState

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZE = 5000
#: The least a prune leaves SQLite's write lock free between two batches: more than
#: the longest sleep of a waiting writer's busy handler (100 ms).
SQLITE_PAUSE = 0.15
#: How often a long prune reports its progress on a table.
PROGRESS_EVERY = 5.0


# --- the statements -------------------------------------------------------------------
#
# A Prunable is a table and the predicate of the rows a prune removes from it. Batches
# delete at most ``limit`` of them with ids in (``after``, ``upto``], the oldest first,
# with ``DELETE … WHERE id IN (SELECT id … ORDER BY id LIMIT n)`` (both engines accept
# it); the caller commits after each batch, so no lock is held for long, and passes the
# batch's last id as the next ``after``. ``upto`` is the last matching id when the prune
# began: rows written since are newer than any cutoff. The two bounds keep each batch from
# re-reading the rows the cutoff keeps, which on a large table held SQLite's write lock.

#: Tag states whose numbers are no longer polled; only their statuses may be pruned.
RETIRED_STATES = tuple(s.value for s in (TagState.COMPLETED, TagState.EXPIRED, TagState.UNTRACKED))
_ds, _ev, _tt = delivery_statuses.c, delivery_status_events.c, tracked_tags.c


class Prunable(NamedTuple):
    """The rows of ``table`` a prune deletes: those matching ``where``."""

    table: sa.Table
    where: Any


class Batch(NamedTuple):
    """One prune batch: rows deleted, and the highest id among them (the next ``after``)."""

    deleted: int
    last_id: int


def _retired_tags(before: datetime) -> Any:
    """Tags no longer polled whose report window ended before ``before``."""
    return sa.select(_tt.tag).where(_tt.state.in_(RETIRED_STATES), _tt.window_ends_at < before)


def events_to_prune(cutoff: datetime | None, *, retired_before: datetime | None) -> Prunable:
    """Status events observed before ``cutoff`` (None: none by age), and with
    ``retired_before`` every event of the tags :func:`statuses_to_prune` selects."""
    conditions = []
    if cutoff is not None:
        conditions.append(_ev.observed_at < cutoff)
    if retired_before is not None:
        conditions.append(_ev.tag.in_(_retired_tags(retired_before)))
    return Prunable(delivery_status_events, sa.or_(*conditions) if conditions else sa.false())


def statuses_to_prune(cutoff: datetime) -> Prunable:
    """The ``delivery_statuses`` rows of retired tags: no longer polled (completed,
    expired or untracked) and their report window ended before ``cutoff``. The tag's
    ``tracked_tags`` and ``tag_counts`` rows and its opt-outs stay."""
    return Prunable(delivery_statuses, _ds.tag.in_(_retired_tags(cutoff)))


def poll_runs_to_prune(cutoff: datetime) -> Prunable:
    """``poll_runs`` rows that finished before ``cutoff``."""
    return Prunable(poll_runs, poll_runs.c.finished_at < cutoff)


def optouts_to_prune(cutoff: datetime) -> Prunable:
    """Opt-outs first seen before ``cutoff`` (only when asked: an opt-out is what keeps
    a number from being messaged again)."""
    return Prunable(stop_sms_optouts, stop_sms_optouts.c.first_seen_at < cutoff)


def last_prunable_id(conn: Connection, rows: Prunable) -> int:
    """The highest id a prune of ``rows`` has to reach (0: nothing to delete). A read:
    on SQLite it runs outside the write lock, however long the scan."""
    return int(conn.scalar(sa.select(sa.func.max(rows.table.c.id)).where(rows.where)) or 0)


def delete_batch(conn: Connection, rows: Prunable, limit: int, *, after: int, upto: int) -> Batch:
    """Delete up to ``limit`` of ``rows`` with ids in (``after``, ``upto``]."""
    id_ = rows.table.c.id
    ids = sa.select(id_).where(rows.where, id_ > after, id_ <= upto).order_by(id_).limit(limit)
    deleted = conn.scalars(sa.delete(rows.table).where(id_.in_(ids)).returning(id_)).all()
    return Batch(len(deleted), max(deleted, default=after))


def count_prunable(conn: Connection, rows: Prunable) -> int:
    """How many rows a prune of ``rows`` would delete (a dry run)."""
    query = sa.select(sa.func.count()).select_from(rows.table).where(rows.where)
    return int(conn.scalar(query) or 0)


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
    rows: Prunable


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
                events_to_prune(events, retired_before=retired),
            )
        )
    if (statuses := cutoffs.statuses) is not None:
        steps.append(
            Step(
                "delivery_statuses",
                f"of tags completed, expired or untracked, window ended before {iso(statuses)}",
                statuses_to_prune(statuses),
            )
        )
    if (runs := cutoffs.runs) is not None:
        steps.append(
            Step(
                "poll_runs",
                f"finished before {iso(runs)}",
                poll_runs_to_prune(runs),
            )
        )
    if (optouts := cutoffs.optouts) is not None:
        steps.append(
            Step(
                "stop_sms_optouts",
                f"first seen before {iso(optouts)}",
                optouts_to_prune(optouts),
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
                result.rows = count_prunable(conn, step.rows)
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
        upto = last_prunable_id(conn, step.rows)
    after = 0
    while after < upto and not should_stop():
        started = time.monotonic()
        with write_transaction(engine) as conn:
            deleted, after = delete_batch(conn, step.rows, batch_size, after=after, upto=upto)
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

    SQLite has one writer, and one waiting in its busy handler retries only every 100 ms
    or so, so the lock stays free for longer than that interval (and than the batch held
    it) or a poll could wait behind batch after batch. The passive checkpoint moves the
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
