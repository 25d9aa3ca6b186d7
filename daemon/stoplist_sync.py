"""One sync of the account's STOP list: fetch every page → one transaction → one
``stop_list_syncs`` row → one log line.

The fetch happens before the transaction opens, as for a poll: a slow provider never
holds a database lock. Then, in one transaction, the sync inserts the numbers new to
``account_optouts``, clears ``removed_at`` on numbers listed again, and sets it on
numbers the list no longer holds, and records itself. Only a complete answer does that
(see :mod:`daemon.stoplist`): a failed, partial or truncated one writes its
``stop_list_syncs`` row and changes nothing else.

Who syncs when. ``run`` syncs at start, then every ``SMSPARTNER_STOP_LIST_INTERVAL_MINUTES``
(:func:`~daemon.stoplist.sync_due`, counted from the last attempt recorded by any
replica); ``run --once`` syncs when the last *successful* sync is older than that;
``optouts --sync`` syncs now. Replicas sharing one PostgreSQL take turns through a
session advisory lock held from before the "is it due?" check to after the commit: a
replica that finds it taken skips quietly (the other is syncing), and the next one to
look finds that sync recorded and not due. ``optouts --sync`` waits for the lock
instead. A SQLite file has one ``run``; the sync's row is its transaction's first
statement, so a concurrent ``optouts --sync`` waits for SQLite's write lock before it
reads what it compares with.

A failed sync is one log line (``stop_list.sync_failed``) and a metric; it never touches
readiness nor tag polling, and the next attempt comes at the next interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from daemon import queries
from daemon.db import UNAVAILABLE_ERRORS, account_optouts, stop_list_syncs, write_transaction
from daemon.errors import ApiError, AuthError, PollAbandoned, describe
from daemon.smspartner import SmsPartnerClient
from daemon.status import PollOutcome
from daemon.stoplist import OK, TRUNCATED, ListedNumber, StopListPages, sync_due

log = structlog.get_logger(__name__)

#: The longest error kept in ``stop_list_syncs.error`` (as in ``poll_runs.error``).
MAX_ERROR_CHARS = 300
#: Arbitrary constant naming the replicas' advisory lock (the migrations use "SMSP").
ADVISORY_LOCK_ID = 0x534D5353  # "SMSS"


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did, as its ``stop_list_syncs`` row records it."""

    outcome: str
    started_at: datetime
    pages: int = 0
    listed: int = 0
    added: int = 0
    removed: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the list was read whole and applied."""
        return self.outcome == OK

    @property
    def summary(self) -> str:
        """``listed N, added A, removed R``: what ``optouts --sync`` prints."""
        return f"listed {self.listed}, added {self.added}, removed {self.removed}"


class StopListSync:
    """Syncs the account's STOP list into ``account_optouts``.

    Args:
        engine: the database.
        client: the SMS Partner client (its retries, deadlines and redaction).
        clock: the clock (aware UTC), read once per sync.
        zone: the provider's time zone, for ``createdAt``.
        interval: how often the daemon syncs (zero: never).
        on_result: called with every recorded sync (the metrics' counter).
    """

    def __init__(
        self,
        *,
        engine: Engine,
        client: SmsPartnerClient,
        clock: Callable[[], datetime],
        zone: tzinfo,
        interval: timedelta,
        on_result: Callable[[SyncResult], None] | None = None,
    ) -> None:
        self._engine = engine
        self._client = client
        self._clock = clock
        self._zone = zone
        self.interval = interval
        self._on_result = on_result

    # --- the three ways in -------------------------------------------------------------

    def sync_now(self) -> SyncResult:
        """Sync now, whatever the schedule (``optouts --sync``); waits for a replica's
        sync under way to end first.

        Raises:
            ApiError, PollAbandoned, and database errors: as :meth:`_sync` says.
        """
        with _replica_lock(self._engine, wait=True):
            return self._sync()

    def sync_if_due(self) -> SyncResult | None:
        """The daemon's job: sync when the last attempt (any replica's) is an interval
        old; None when it is not, or when another replica is syncing right now."""
        with _replica_lock(self._engine, wait=False) as held:
            if not held:
                log.debug("stop_list.skipped", reason="another replica is syncing")
                return None
            with self._engine.connect() as conn:
                last = queries.last_stop_list_sync(conn)
            started, outcome = (last["started_at"], last["outcome"]) if last else (None, None)
            if not sync_due(started, outcome, now=self._clock(), interval=self.interval):
                return None
            return self._sync()

    def sync_if_stale(self) -> SyncResult | None:
        """``run --once``: sync when the last successful sync is older than the interval
        (or there was none); None otherwise."""
        if self.interval <= timedelta(0):
            return None
        with _replica_lock(self._engine, wait=False) as held:
            if not held:
                return None
            with self._engine.connect() as conn:
                last = queries.last_stop_list_sync(conn, ok_only=True)
            if last is not None and self._clock() - last["started_at"] < self.interval:
                return None
            return self._sync()

    # --- one sync -------------------------------------------------------------------------

    def _sync(self) -> SyncResult:
        """Fetch the list, then apply it or record why not, in one transaction.

        Raises:
            PollAbandoned: the daemon is stopping; nothing was written.
            sqlalchemy.exc.DBAPIError: the database failed; nothing was written.
        """
        now = self._clock()
        try:
            pages = self._client.fetch_stop_list(zone=self._zone, now=now)
        except ApiError as exc:
            if isinstance(exc, AuthError):
                outcome = PollOutcome.AUTH_ERROR.value
            elif exc.transient:
                outcome = PollOutcome.TRANSIENT_ERROR.value
            else:
                outcome = PollOutcome.API_ERROR.value
            return self._record(SyncResult(outcome, now, error=_storable(str(exc))))
        except (PollAbandoned, *UNAVAILABLE_ERRORS):
            raise
        except Exception as exc:  # a bug: recorded, see _record_crash
            return self._record_crash(now, exc)
        if not pages.complete:
            result = SyncResult(
                TRUNCATED,
                now,
                pages=pages.pages,
                listed=len(pages.numbers),
                error=_storable(pages.why_incomplete),
            )
            return self._record(result)
        try:
            return self._record(SyncResult(OK, now, pages=pages.pages), pages)
        except UNAVAILABLE_ERRORS:
            raise
        except Exception as exc:  # a row the database refused, a bug: nothing was applied
            return self._record_crash(now, exc)

    def _record_crash(self, now: datetime, exc: Exception) -> SyncResult:
        """Record a sync that failed unexpectedly as a transient failure, in a transaction
        of its own. Without its row the last attempt would stay the one before, and the
        daemon would fetch the whole list again at every look (once a minute) until the
        bug is fixed. The traceback goes to the debug level only; the error line is
        ``stop_list.sync_failed``'s, as for any failed sync.
        """
        log.debug("stop_list.crash_traceback", exc_info=exc)
        error = _storable(self._client.redact(f"unexpected {describe(exc)}"))
        return self._record(SyncResult(PollOutcome.TRANSIENT_ERROR.value, now, error=error))

    def _record(self, result: SyncResult, pages: StopListPages | None = None) -> SyncResult:
        """Write the sync's row (and, for a complete answer, the list), log, count."""
        with write_transaction(self._engine) as conn:
            # First: on SQLite this takes the write lock before the list is read below.
            key = conn.execute(
                sa.insert(stop_list_syncs).values(
                    started_at=result.started_at,
                    finished_at=self._clock(),
                    outcome=result.outcome,
                    pages=result.pages,
                    listed=result.listed,
                    error=result.error,
                )
            ).inserted_primary_key
            assert key is not None  # a single-row INSERT always has one
            if pages is not None:
                added, removed = apply_list(conn, pages.numbers, now=result.started_at)
                result = SyncResult(
                    result.outcome,
                    result.started_at,
                    pages=result.pages,
                    listed=len(pages.numbers),
                    added=added,
                    removed=removed,
                )
                conn.execute(
                    sa.update(stop_list_syncs)
                    .where(stop_list_syncs.c.id == key[0])
                    .values(
                        finished_at=self._clock(),
                        listed=result.listed,
                        added=added,
                        removed=removed,
                    )
                )
        fields = {
            "outcome": result.outcome,
            "pages": result.pages,
            "listed": result.listed,
            "added": result.added,
            "removed": result.removed,
        }
        if result.ok:
            log.info("stop_list.synced", **fields)
        else:
            hint = {"hint": "check SMSPARTNER_API_KEY"} if result.outcome == "auth_error" else {}
            log.error("stop_list.sync_failed", **fields, error=result.error, **hint)
        if self._on_result is not None:
            self._on_result(result)
        return result


def apply_list(
    conn: Connection, numbers: Mapping[str, ListedNumber], *, now: datetime
) -> tuple[int, int]:
    """Make ``account_optouts`` agree with a complete list; returns (added, removed).

    New numbers are inserted (``first_seen_at`` = ``now``); a number listed again has
    ``removed_at`` cleared (it counts as added); a number no longer listed gets
    ``removed_at`` = ``now``. ``provider_id`` and ``listed_at`` follow the list, but a
    value the list no longer gives (an unreadable ``createdAt``) keeps the stored one.
    Only rows that change are written. The caller owns the transaction and makes sure
    nothing else syncs meanwhile (see the module docstring).
    """
    ao = account_optouts.c
    stored = {
        row.phone_number: row
        for row in conn.execute(
            sa.select(ao.phone_number, ao.provider_id, ao.listed_at, ao.removed_at)
        )
    }
    new: list[dict[str, object]] = []
    changed: list[dict[str, object]] = []
    relisted = 0
    for phone, entry in numbers.items():
        row = stored.get(phone)
        if row is None:
            new.append(
                {
                    "phone_number": phone,
                    "provider_id": entry.provider_id,
                    "listed_at": entry.listed_at,
                    "first_seen_at": now,
                    "removed_at": None,
                }
            )
            continue
        provider_id = entry.provider_id if entry.provider_id is not None else row.provider_id
        listed_at = entry.listed_at if entry.listed_at is not None else row.listed_at
        back = row.removed_at is not None
        relisted += back
        if back or (provider_id, listed_at) != (row.provider_id, row.listed_at):
            changed.append({"b_phone": phone, "b_id": provider_id, "b_listed": listed_at})
    gone = [
        {"b_phone": phone}
        for phone, row in stored.items()
        if row.removed_at is None and phone not in numbers
    ]
    if new:
        conn.execute(sa.insert(account_optouts), new)
    if changed:
        conn.execute(
            sa.update(account_optouts)
            .where(ao.phone_number == sa.bindparam("b_phone"))
            .values(
                provider_id=sa.bindparam("b_id"),
                listed_at=sa.bindparam("b_listed", type_=account_optouts.c.listed_at.type),
                removed_at=None,
            ),
            changed,
        )
    if gone:
        conn.execute(
            sa.update(account_optouts)
            .where(ao.phone_number == sa.bindparam("b_phone"), ao.removed_at.is_(None))
            .values(removed_at=now),
            gone,
        )
    return len(new) + relisted, len(gone)


def _storable(text: str) -> str:
    """An error for ``stop_list_syncs.error``: one line, bounded (already redacted by
    the client, which quotes no provider body)."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"


@contextmanager
def _replica_lock(engine: Engine, *, wait: bool) -> Iterator[bool]:
    """Hold the replicas' advisory lock (PostgreSQL) for the block; yields whether it is
    held. ``wait``: block until it is free, else give up at once.

    A session lock on a connection of its own, not a transaction's: the fetch runs
    between, and no transaction stays open across a request to the provider. If the
    process dies, the server drops the lock with the connection. Other databases have
    one writer, and the block always runs.
    """
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        held = bool(
            conn.scalar(sa.text("SELECT pg_try_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
        )
        if not held and wait:
            log.info("stop_list.waiting", reason="another replica is syncing")
            conn.execute(sa.text("SELECT pg_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
            held = True
        conn.commit()  # the lock outlives the transaction; no transaction stays open
        try:
            yield held
        finally:
            if held:
                try:
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID}
                    )
                    conn.commit()
                except sa.exc.DBAPIError:
                    conn.invalidate()  # never back to the pool holding the lock
