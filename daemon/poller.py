"""One poll of one tag: fetch every page → merge → store in one transaction → one
``poll_runs`` row → one canonical log line.

The fetch happens before the transaction opens, so a slow provider never holds a
database lock; everything the poll writes (statuses, events, opt-outs, the tag's new
state and the run row) commits together or not at all. A failed fetch writes only the
run row and the tag's failure counters: stored statuses are never touched.

Provider data never crashes a poll. Items the store could not hold are skipped by the
parser (:mod:`daemon.responses`); dates outside a sane range are stored as unknown here.
Anything else that goes wrong (an answer nothing foresaw, a bug, a statement the
database refuses) is recorded like a transient failure: a ``poll_runs`` row, the tag's
failure counters and a backed-off next due time, so a tag that keeps crashing is retried
on the backoff schedule instead of at once. Only a database that cannot be written at
all leaves nothing behind (:class:`~daemon.errors.StoreError`); the scheduler then
cools the tag down in memory.

A poller remembers the last reports of the large active tags it polled
(:mod:`daemon.answers`), so their re-polls merge, diff and read back only the numbers
whose report changed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.engine import Connection, Engine

from daemon import answers, queries, store, tracking
from daemon.answers import Answer, Answers
from daemon.db import UNAVAILABLE_ERRORS, write_transaction
from daemon.errors import (
    ApiError,
    AuthError,
    DatabaseUnavailableError,
    InputError,
    NoMessagesError,
    PollAbandoned,
    StoreError,
    describe,
)
from daemon.redaction import redact
from daemon.settings import Settings
from daemon.smspartner import FetchResult, SmsPartnerClient
from daemon.status import (
    AUTH_RETRY,
    PENDING,
    Decision,
    Lifecycle,
    PollOutcome,
    Report,
    TagNow,
    TagState,
    decide,
    merge_reports,
    plausible_report_date,
    window_end,
)
from daemon.store import Tally

__all__ = ["AUTH_RETRY", "GC_THRESHOLD", "MAX_ERROR_CHARS", "PollResult", "Poller", "tune_gc"]

log = structlog.get_logger(__name__)

#: The longest error text kept in ``poll_runs.error`` and ``tracked_tags.last_error``.
MAX_ERROR_CHARS = 300
#: The garbage collector's first threshold (CPython's default is 700 allocations).
GC_THRESHOLD = 50_000


def tune_gc() -> None:
    """Make the cyclic garbage collector run less often; the composition root calls it.

    A large poll keeps its reports and rows alive until it commits, and the default
    threshold rescans them over and over (figures in docs/performance.md); reference
    counting still frees everything else at once, only cycles wait a little longer.
    """
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def _final_delays(
    reported: list[datetime | None], sent_at: datetime, now: datetime
) -> tuple[float, ...]:
    """Seconds from sending to each newly final report (now for one without a date).

    A campaign's reports share few dates: each distinct one is subtracted once, where
    100,000 subtractions were a few percent of a large first poll.
    """
    seconds = {when: ((when or now) - sent_at).total_seconds() for when in set(reported)}
    return tuple(map(seconds.__getitem__, reported))


class _StaleAnswer(Exception):
    """The tag was written by something else while this poll fetched with its answer."""


@dataclass(frozen=True, slots=True)
class PollResult:
    """What one poll did, for the CLI summary, the scheduler and metrics."""

    tag: str
    outcome: PollOutcome
    state: TagState
    pages: int = 0
    numbers_seen: int = 0
    changed: int = 0
    events: int = 0
    optouts: int = 0
    skipped: int = 0
    expired: int = 0
    no_messages: bool = False
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: Seconds from sending to the final report, for numbers that became final now.
    final_delays: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the poll succeeded (code 4, "no messages yet", is a success)."""
        return self.outcome is PollOutcome.OK


class Poller:
    """Polls single tags; shared by the CLI's ``poll`` and the daemon's worker pool."""

    def __init__(
        self,
        *,
        engine: Engine,
        client: SmsPartnerClient,
        settings: Settings,
        clock: Callable[[], datetime],
        answers: Answers | None = None,
    ) -> None:
        self._engine = engine
        self._client = client
        self._settings = settings
        self._lifecycle = Lifecycle(cadence=settings.cadence, settle=settings.settle)
        self._clock = clock
        self._answers = Answers() if answers is None else answers

    def poll(self, tag: str) -> PollResult:
        """Poll one tracked tag now and store what changed.

        Whatever goes wrong with the provider's answer or inside the poll, the poll is
        recorded (a failed ``poll_runs`` row, the tag backed off) and its result
        returned; only the exceptions below come out.

        Raises:
            InputError: the tag is not tracked.
            DatabaseUnavailableError: the database failed; nothing of this poll is kept.
            StoreError: the poll failed and even its failure could not be recorded.
            PollAbandoned: the daemon is stopping and the fetch could not end in time;
                nothing of this poll is written, the tag stays due.
        """
        now = self._clock()
        try:
            try:
                return self._poll(tag, self._remembered(tag), now)
            except _StaleAnswer:
                # Something else wrote the tag while this poll fetched: poll it in full.
                self._answers.forget(tag)
                return self._poll(tag, None, now)
        except (InputError, PollAbandoned, DatabaseUnavailableError):
            raise
        except Exception as exc:  # the transaction was rolled back: record the failure
            self._answers.forget(tag)
            return self._record_crash(tag, now, self._crash_error(tag, exc))

    def _remembered(self, tag: str) -> Answer | None:
        """The tag's remembered answer, if the tag's row still carries its marker."""
        answer = self._answers.get(tag)
        if answer is None:
            return None
        try:
            with self._engine.connect() as conn:
                row = tracking.get_tag(conn, tag)
        except UNAVAILABLE_ERRORS:
            return None  # the poll's own transaction reports the database's trouble
        if row is None or answers.marker(row) != answer.marker:
            self._answers.forget(tag)
            return None
        return answer

    def _poll(self, tag: str, answer: Answer | None, now: datetime) -> PollResult:
        fetched, error = FetchResult([], 0, 0, 0, "empty_page"), None
        outcome = PollOutcome.OK
        no_messages = False
        merged: dict[str, Report] = {}
        try:
            fetched = self._client.fetch_tag(tag, answer.reports if answer else None)
            merged = merge_reports(self._sane_dates(tag, fetched.reports, now))
        except NoMessagesError:
            no_messages = True
        except AuthError as exc:
            outcome, error = PollOutcome.AUTH_ERROR, self._storable(str(exc))
        except ApiError as exc:
            outcome = PollOutcome.TRANSIENT_ERROR if exc.transient else PollOutcome.API_ERROR
            error = self._storable(str(exc))
        except PollAbandoned:
            raise
        except Exception as exc:  # an answer nothing foresaw, or a bug: a failed poll
            outcome, error = PollOutcome.TRANSIENT_ERROR, self._crash_error(tag, exc)
            fetched, merged = FetchResult([], fetched.pages, 0, 0, "crashed"), {}

        try:
            with write_transaction(self._engine) as conn:
                row = tracking.lock_tag(conn, tag)
                if row is None:
                    raise InputError(
                        f"tag {tag!r} is not tracked; run `smspartner-status track {tag}`"
                    )
                if answer is not None and answers.marker(row) != answer.marker:
                    raise _StaleAnswer
                tally = answer.tally if answer else None
                result, applied = self._store(
                    conn, row, now, fetched, merged, outcome, error, no_messages, tally
                )
        except UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailableError(f"database error: {exc.orig}") from exc
        if result.ok and result.state is TagState.ACTIVE:
            reports = {**answer.reports, **merged} if answer else merged
            tally = Tally(applied.counts, applied.stop_sms)
            remembered = Answer((row["poll_count"] + 1, now), reports, tally)
            self._answers.remember(tag, remembered)
        else:
            self._answers.forget(tag)
        # Only once committed: a rolled-back poll must not announce opt-outs it never stored.
        for phone, reported_at in applied.optouts:
            log.info("stop_sms.opt_out", tag=tag, phone_number=phone, reported_at=reported_at)
        self._log(result)
        return result

    def _sane_dates(self, tag: str, reports: list[Report], now: datetime) -> list[Report]:
        """The reports, with every date outside 2000 … now + 1 day made unknown (None).

        A date in the year 5138 would win every later comparison and block the correctly
        dated reports that follow; an unknown date never replaces a final status. A
        campaign's reports share few distinct dates, so the usual poll only checks those.
        """
        bad = {
            when
            for when in {report.reported_at for report in reports}
            if when is not None and not plausible_report_date(when, now)
        }
        if not bad:
            return reports
        log.warning(
            "api.item_coerced",
            tag=tag,
            field="date",
            value=min(bad).isoformat(),
            outcome="kept without a date: outside 2000-01-01 to a day ahead",
            items=sum(report.reported_at in bad for report in reports),
        )
        return [r._replace(reported_at=None) if r.reported_at in bad else r for r in reports]

    def _crash_error(self, tag: str, exc: Exception) -> str:
        """Log an unexpected exception of a poll (``poll.crashed``; the traceback at debug
        level only) and return the short error text its ``poll_runs`` row keeps."""
        error = self._storable(f"unexpected {describe(exc)}")
        log.error("poll.crashed", tag=tag, error=error)
        log.debug("poll.crash_traceback", tag=tag, exc_info=exc)
        return error

    def _storable(self, text: str) -> str:
        """Error text fit for a column, a log line and a terminal: the key redacted, no
        NUL, no lone surrogate, at most :data:`MAX_ERROR_CHARS` characters."""
        key = self._settings.api_key
        text = " ".join(redact(text, key.get_secret_value() if key else None).split())
        text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
        return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"

    def _record_crash(self, tag: str, now: datetime, error: str) -> PollResult:
        """Record a poll whose transaction failed as a transient failure, in a
        transaction of its own: a ``poll_runs`` row and what :func:`~daemon.status.decide`
        makes of a failure (its counters, a next due time backed off like any failure's,
        never at once, so a tag whose poll keeps crashing does not starve the others; past
        the window's grace period, its expiry).

        Raises:
            StoreError: even this could not be written (the scheduler cools the tag
                down in memory instead); :class:`DatabaseUnavailableError` when the
                database could not be reached.
        """
        outcome = PollOutcome.TRANSIENT_ERROR
        try:
            with write_transaction(self._engine) as conn:
                row = tracking.lock_tag(conn, tag)
                if row is None:
                    raise StoreError(f"poll of {tag!r} failed: {error}")
                decision, expired, counts, finished = self._conclude(
                    conn, row, now, outcome, {}, error
                )
        except StoreError:
            raise
        except Exception as exc:
            message = self._storable(
                f"poll of {tag!r} failed ({error}) and could not be recorded: " + describe(exc)
            )
            if isinstance(exc, UNAVAILABLE_ERRORS):
                raise DatabaseUnavailableError(message) from exc
            raise StoreError(message) from exc
        result = PollResult(
            tag=tag,
            outcome=outcome,
            state=decision.state,
            changed=expired,
            events=expired,
            expired=expired,
            error=error,
            counts=counts,
            seconds=(finished - now).total_seconds(),
        )
        self._log(result)
        return result

    def _store(
        self,
        conn: Connection,
        row: Mapping[str, Any],
        now: datetime,
        fetched: FetchResult,
        merged: dict[str, Report],
        outcome: PollOutcome,
        error: str | None,
        no_messages: bool,
        tally: Tally | None,
    ) -> tuple[PollResult, store.Applied]:
        """Write the poll's effects, as :func:`~daemon.status.decide` rules them;
        returns its result and what it applied."""
        tag: str = row["tag"]
        sent_at: datetime = row["sent_at"]
        ok = outcome is PollOutcome.OK
        applied = store.Applied()
        counts: dict[str, int] = {}
        if ok:
            applied = store.apply_reports(conn, tag, merged, now=now, tally=tally)
            counts = applied.counts
        decision, expired, counts, finished = self._conclude(
            conn, row, now, outcome, counts, error, fetched=fetched, changed=applied.changed
        )
        result = PollResult(
            tag=tag,
            outcome=outcome,
            state=decision.state,
            pages=fetched.pages,
            numbers_seen=fetched.numbers,
            changed=applied.changed + expired,
            events=applied.events + expired,
            optouts=len(applied.optouts),
            skipped=fetched.skipped,
            expired=expired,
            no_messages=no_messages,
            error=error,
            counts=counts,
            seconds=(finished - now).total_seconds(),
            final_delays=_final_delays(applied.newly_final, sent_at, now),
        )
        return result, applied

    def _conclude(
        self,
        conn: Connection,
        row: Mapping[str, Any],
        now: datetime,
        outcome: PollOutcome,
        counts: dict[str, int],
        error: str | None,
        *,
        fetched: FetchResult | None = None,
        changed: int = 0,
    ) -> tuple[Decision, int, dict[str, int], datetime]:
        """Apply what :func:`~daemon.status.decide` makes of the poll's outcome to its
        tag, and write the poll's ``poll_runs`` row; returns the decision, how many
        numbers it expired, the tag's counts after it and when the poll finished.

        The decision is taken now, when the answer is in, not at the poll's start: a
        provider that held the poll for its whole deadline must not find the tag due again
        the moment the poll ends (a few such tags would then hold every worker).
        """
        tag: str = row["tag"]
        ok = outcome is PollOutcome.OK
        decision = decide(
            self._tag_now(row), outcome, counts, now=self._clock(), lifecycle=self._lifecycle
        )
        expired, counts = self._expire(conn, tag, decision, now, counts if ok else None)
        finished = self._clock()
        store.record_poll_run(
            conn,
            tag,
            started_at=now,
            finished_at=finished,
            outcome=outcome,
            pages=fetched.pages if fetched else 0,
            numbers_seen=fetched.numbers if fetched else 0,
            numbers_changed=changed + expired,
            error=error,
        )
        tracking.finish_poll(conn, tag, now=now, decision=decision, error=error)
        return decision, expired, counts, finished

    @staticmethod
    def _expire(
        conn: Connection,
        tag: str,
        decision: Decision,
        now: datetime,
        counts: dict[str, int] | None = None,
    ) -> tuple[int, dict[str, int]]:
        """Expire the tag's pending numbers if the decision says so; returns how many,
        and the tag's counts after it (``counts`` when nothing moved, else read back from
        the tag's counts row)."""
        expired = store.expire_pending(conn, tag, now=now) if decision.expire_pending else 0
        if counts is None or expired:
            counts = queries.status_counts(conn, tag)
        return expired, counts

    def _tag_now(self, row: Mapping[str, Any]) -> TagNow:
        """What :func:`~daemon.status.decide` needs of the tag's locked row."""
        return TagNow(
            state=TagState(row["state"]),
            sent_at=row["sent_at"],
            window_ends_at=self._window_ends_at(row),
            consecutive_failures=row["consecutive_failures"],
        )

    def _window_ends_at(self, row: Mapping[str, Any]) -> datetime:
        """The tag's window end; a row another program inserted may not have one yet."""
        ends: datetime | None = row["window_ends_at"]
        return ends or window_end(row["sent_at"], self._settings.report_window)

    @staticmethod
    def _log(result: PollResult) -> None:
        fields = {
            "tag": result.tag,
            "outcome": result.outcome,
            "state": result.state,
            "pages": result.pages,
            "numbers_seen": result.numbers_seen,
            "numbers_changed": result.changed,
            "events": result.events,
            "optouts": result.optouts,
            "skipped": result.skipped,
            "expired": result.expired,
            "waiting": sum(result.counts.get(s.value, 0) for s in PENDING),
            "duration_ms": round(result.seconds * 1000, 1),
        }
        if result.ok:
            log.info("poll.completed", no_messages=result.no_messages, **fields)
        else:
            log.warning("poll.failed", error=result.error, **fields)
