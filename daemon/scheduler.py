"""The daemon loop: an APScheduler job claims due tags and polls them on a bounded pool.

Every ``dispatch_interval`` (and at once when woken, e.g. after ``POST /tags``) the
dispatcher:

1. beats (health, heartbeat file, systemd ``WATCHDOG=1``) and renews the leases of the
   tags it is polling;
2. completes tags other programs inserted by hand (window, due time);
3. unless an API key problem pauses polling, leases as many due tags as the pool has free
   workers (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas share the work) and
   submits one poll each. A tag is never polled twice at once: the lease guards other
   replicas, the in-flight set guards this one.

A poll that ends in an exception (the database failed, or even its failure could not be
recorded) has moved nothing forward in the database: its tag is still due. The
dispatcher then leaves it alone for a while, in memory (:data:`COOL_DOWN`, doubling per
such failure in a row), so one broken tag is never re-polled at once and cannot starve
the others.

Codes 1/10 pause all claiming for five minutes, then one tag is polled as a probe. On
SIGTERM/SIGINT the daemon stops claiming and lets polls in flight finish and commit, as
long as they can before :data:`SHUTDOWN_GRACE` runs out; a poll that cannot is abandoned
without writing anything (the tag stays due). Then it releases its leases, removes its
heartbeat file (so ``check`` fails at once) and exits 0.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine

from daemon import tracking
from daemon.db import UNAVAILABLE_ERRORS, write_transaction
from daemon.errors import DatabaseUnavailableError, PollAbandoned, StoreError
from daemon.health import Health, Notifier, remove_heartbeat, write_heartbeat
from daemon.poller import AUTH_RETRY, PollResult
from daemon.shutdown import SHUTDOWN_GRACE as SHUTDOWN_GRACE  # re-exported: tests read it
from daemon.shutdown import Shutdown
from daemon.signals import SignalWatch
from daemon.status import PollOutcome

if TYPE_CHECKING:
    from daemon.stoplist_sync import StopListSync, SyncResult

log = structlog.get_logger(__name__)

#: How long a claimed tag stays leased without renewal (a crashed replica's tags are
#: taken over after this). Renewed on every dispatch while the poll runs, and by
#: ``run --once`` every third of it.
LEASE = timedelta(seconds=60)
#: How long a tag whose poll ended in an exception is not claimed again by this process,
#: doubling with each such poll in a row up to :data:`MAX_COOL_DOWN`. Short at first: a
#: database back from an outage should see the tags it cut off within a few dispatches;
#: a tag that fails that way every time soon waits minutes.
COOL_DOWN = timedelta(seconds=5)
MAX_COOL_DOWN = timedelta(minutes=5)
#: How often the maintenance job (retention) runs; its first run is at start.
MAINTENANCE_INTERVAL = timedelta(days=1)


class PollFn(Protocol):
    """What the scheduler needs of a poller."""

    def __call__(self, tag: str) -> PollResult: ...


@dataclass
class DaemonStats:
    """Counts for ``run --once`` and the demo's progress line."""

    polls: int = 0
    failures: int = 0
    #: Every poll's result, kept by ``run --once`` only (a long-running daemon would grow).
    results: list[PollResult] = field(default_factory=list)
    #: ``run --once``: the sync of the account's STOP list, if one was due and recorded;
    #: or why it could not even be recorded.
    stop_list: SyncResult | None = None
    stop_list_error: str | None = None


class Daemon:
    """Owns the dispatcher, the worker pool and the shutdown sequence."""

    def __init__(
        self,
        *,
        engine: Engine,
        poll: PollFn,
        clock: Callable[[], datetime],
        health: Health,
        concurrency: int,
        report_window: timedelta,
        on_result: Callable[[PollResult], None] | None = None,
        notifier: Notifier | None = None,
        heartbeat: Path | None = None,
        dispatch_interval: float = 2.0,
        owner: str | None = None,
        maintenance: Callable[[], None] | None = None,
        lease: timedelta = LEASE,
        shutdown: Shutdown | None = None,
        stop_list: StopListSync | None = None,
        stop_list_tick: float = 60.0,
    ) -> None:
        self._engine = engine
        self._poll = poll
        self._clock = clock
        self._health = health
        self._concurrency = concurrency
        self._window = report_window
        self._on_result = on_result
        self._notifier = notifier or Notifier(socket_path="")
        self._heartbeat = heartbeat
        self._heartbeat_failing = False
        self._heartbeat_written: datetime | None = None
        self._interval = dispatch_interval
        self._maintenance = maintenance
        self._lease = lease
        self._stop_list = stop_list
        self._stop_list_tick = max(stop_list_tick, 0.01)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="poll")
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[None]] = {}
        #: Tags whose last poll here ended in an exception: (not before, how many in a row).
        self._cooling: dict[str, tuple[datetime, int]] = {}
        # Shared with the API client and the maintenance job (see daemon/app.py).
        self.shutdown = shutdown or Shutdown()
        self._auth_paused_until: datetime | None = None
        self._scheduler: BackgroundScheduler | None = None
        # run --once: only tags due at the pass's start; a polled tag is due again later.
        self._once_cutoff: datetime | None = None
        self.stats = DaemonStats()

    # --- the shutdown deadline, as the API client sees it ------------------------------

    def interruptible_sleep(self, seconds: float) -> None:
        """The API client's ``sleep``: :meth:`Shutdown.sleep` of this daemon's stop."""
        self.shutdown.sleep(seconds)

    def shutdown_deadline(self) -> float | None:
        """The API client's ``deadline``: :meth:`Shutdown.deadline` of this daemon's stop."""
        return self.shutdown.deadline()

    @property
    def polls_in_flight(self) -> int:
        """How many polls this process is running now (tests step the daemon with it)."""
        with self._lock:
            return len(self._in_flight)

    @property
    def stopping(self) -> bool:
        """True once shutdown began (long maintenance work checks it between batches)."""
        return self.shutdown.stopping

    def _maintain(self) -> None:
        """The daily maintenance job; a failure is logged and retried the next day."""
        assert self._maintenance is not None
        try:
            self._maintenance()
        except UNAVAILABLE_ERRORS as exc:
            log.error("maintenance.database_unavailable", error=str(exc.orig))
        except Exception:  # a bug must not stop the scheduler or leave a traceback unlogged
            log.exception("maintenance.crashed")

    # --- the account's STOP list -------------------------------------------------------

    def _sync_stop_list(self) -> None:
        """The STOP list job: sync when due (see :mod:`daemon.stoplist_sync`).

        Runs beside the dispatcher, never in its way: a failing sync is one log line
        (and a metric), touches neither readiness nor polling, and is tried again at
        the next interval. While a rejected key pauses polling it pauses this too.
        """
        assert self._stop_list is not None
        self._run_stop_list(self._stop_list.sync_if_due)

    def _run_stop_list(self, sync: Callable[[], SyncResult | None]) -> SyncResult | None:
        with self._lock:
            paused = self._auth_paused_until is not None
        if paused or self.shutdown.stopping:
            return None
        try:
            return sync()
        except PollAbandoned:
            return None  # stopping: nothing was written, the next start syncs
        except UNAVAILABLE_ERRORS as exc:
            self.stats.stop_list_error = f"database unavailable: {exc.orig}"
            log.error("stop_list.database_unavailable", error=str(exc.orig))
        except Exception as exc:  # a bug must not stop the scheduler or go unlogged
            self.stats.stop_list_error = f"{type(exc).__name__}: {exc}"
            log.exception("stop_list.crashed")
        return None

    # --- dispatching ---------------------------------------------------------------------

    def dispatch(self) -> int:
        """One dispatcher pass; returns how many polls it started."""
        now = self._clock()
        self._health.beat()
        if self._heartbeat is not None:
            try:
                write_heartbeat(self._heartbeat, now)
                self._heartbeat_written = now
                self._heartbeat_failing = False
            except OSError as exc:  # e.g. a read-only /tmp: `check` cannot see us
                if not self._heartbeat_failing:
                    log.warning(
                        "daemon.heartbeat_failed", path=str(self._heartbeat), error=exc.strerror
                    )
                self._heartbeat_failing = True
        self._notifier.notify("WATCHDOG=1")
        if self.shutdown.stopping:
            return 0
        try:
            started = self._claim_and_submit(now)
        except UNAVAILABLE_ERRORS as exc:
            self._health.database(str(exc.orig))
            log.error("daemon.database_unavailable", error=str(exc.orig))
            return 0
        self._health.database(None)
        return started

    def _claim_and_submit(self, now: datetime) -> int:
        with self._lock:
            in_flight = list(self._in_flight)
            exclude = set(in_flight) | self._cooling_tags(now)
            free = self._concurrency - len(in_flight)
            if self._auth_paused_until is not None:
                if now < self._auth_paused_until:
                    free = 0
                else:
                    free = min(free, 1)  # one probe poll tells whether the key works again
                    self._auth_paused_until = now + AUTH_RETRY
        with write_transaction(self._engine) as conn:
            tracking.renew_leases(conn, in_flight, owner=self.owner, lease_until=now + self._lease)
            filled = tracking.fill_missing_windows(conn, window=self._window, now=now)
            tags = (
                tracking.claim_due(
                    conn,
                    now=self._once_cutoff or now,
                    owner=self.owner,
                    lease_until=now + self._lease,
                    limit=free,
                    exclude=exclude,
                )
                if free > 0
                else []
            )
        for tag in filled:
            log.info("tag.adopted", tag=tag)
        for tag in tags:
            self._submit(tag)
        return len(tags)

    def _submit(self, tag: str) -> None:
        with self._lock:
            if tag in self._in_flight:
                return
            self._in_flight[tag] = self._pool.submit(self._run_poll, tag)

    def _run_poll(self, tag: str | None) -> None:
        """Poll ``tag``, then keep this worker busy with the next due tag, if any.

        Claiming the next tag here, rather than waiting for the next dispatch, keeps the
        pool saturated when polls are short: a dispatch every 2 s alone would cap a pool
        of 4 at 2 polls a second.
        """
        while tag is not None:
            try:
                self._poll_one(tag)
            except BaseException:  # e.g. a metrics bug: the tag must not stay "in flight"
                with self._lock:
                    self._in_flight.pop(tag, None)
                raise
            tag = self._claim_next(tag)

    def _poll_one(self, tag: str) -> None:
        """Poll ``tag`` and account for the outcome, whatever it is."""
        self._health.poll_started()
        try:
            result = self._poll(tag)
        except PollAbandoned as exc:
            # Nothing of it was written: the tag is still due, its lease goes with
            # the others at the end of the shutdown, and the next start polls it.
            self._health.poll_finished(False)
            log.warning("poll.abandoned", tag=tag, pages=exc.pages, reason=str(exc))
        except Exception as exc:  # nothing recorded: the tag is still due
            self._cool_down(tag)
            self._health.poll_finished(False)
            if isinstance(exc, DatabaseUnavailableError):
                self._health.database(str(exc))
            if isinstance(exc, StoreError):  # the poller said what failed, in one line
                log.error("poll.database_error", tag=tag, error=str(exc))
            else:  # a bug outside the poller's own handling: keep the traceback
                log.exception("poll.crashed", tag=tag)
            self._count(None)
        else:
            self._after_poll(result)

    def _cool_down(self, tag: str) -> None:
        """Keep this process from claiming ``tag`` for a while (see :data:`COOL_DOWN`)."""
        now = self._clock()
        with self._lock:
            _, failures = self._cooling.get(tag, (now, 0))
            wait = min(COOL_DOWN * 2 ** min(failures, 16), MAX_COOL_DOWN)
            self._cooling[tag] = (now + wait, failures + 1)

    def _cooling_tags(self, now: datetime) -> set[str]:
        """Tags still cooling down at ``now`` (call with the lock held)."""
        return {tag for tag, (until, _) in self._cooling.items() if now < until}

    def _claim_next(self, done: str) -> str | None:
        """Lease one more due tag for the calling worker, which has just polled ``done``
        (None when there is none).

        ``done`` leaves the in-flight set only once the next tag is claimed, in the same
        step as the next tag enters it: it is not claimed again right away (if its poll
        ended without recording anything, it is still due), and the set is never empty
        while this worker goes on.
        """
        claimed: str | None = None
        try:
            claimed = self._claim_one()
        finally:
            with self._lock:
                future = self._in_flight.pop(done, None)
                if claimed is not None and (future is None or claimed in self._in_flight):
                    claimed = None
                if claimed is not None and future is not None:
                    self._in_flight[claimed] = future
        return claimed

    def _claim_one(self) -> str | None:
        if self.shutdown.stopping:
            return None
        now = self._clock()
        with self._lock:
            if self._auth_paused_until is not None:
                return None
            exclude = set(self._in_flight) | self._cooling_tags(now)
        try:
            with write_transaction(self._engine) as conn:
                tags = tracking.claim_due(
                    conn,
                    now=self._once_cutoff or now,
                    owner=self.owner,
                    lease_until=now + self._lease,
                    limit=1,
                    exclude=exclude,
                )
        except UNAVAILABLE_ERRORS:
            return None  # the dispatcher reports it and retries
        return tags[0] if tags else None

    def _after_poll(self, result: PollResult) -> None:
        self._health.poll_finished(result.ok)
        with self._lock:  # several polls may hit the wrong key at once: log it once
            self._cooling.pop(result.tag, None)  # recorded: its schedule is the database's
            was_paused = self._auth_paused_until is not None
            if result.outcome is PollOutcome.AUTH_ERROR:
                self._auth_paused_until = self._clock() + AUTH_RETRY
            elif result.ok:
                self._auth_paused_until = None
        if result.outcome is PollOutcome.AUTH_ERROR:
            self._health.auth(result.error)
            if not was_paused:
                log.error(
                    "daemon.auth_paused",
                    error=result.error,
                    retry_in_seconds=int(AUTH_RETRY.total_seconds()),
                    hint="check SMSPARTNER_API_KEY",
                )
        elif result.ok and was_paused:
            self._health.auth(None)
            log.info("daemon.auth_resumed")
        self._count(result)
        if self._on_result is not None:
            self._on_result(result)

    def _count(self, result: PollResult | None) -> None:
        with self._lock:
            self.stats.polls += 1
            if result is None or not result.ok:
                self.stats.failures += 1
            if result is not None and self._once_cutoff is not None:
                self.stats.results.append(result)  # run --once only: a daemon would grow

    def wake(self) -> None:
        """Dispatch as soon as possible (a tag was just registered)."""
        if self._scheduler is not None and not self.shutdown.stopping:
            self._scheduler.modify_job("dispatch", next_run_time=datetime.now().astimezone())

    # --- lifecycles ----------------------------------------------------------------------

    def run_once(self) -> DaemonStats:
        """Poll every due tag once, then return (``run --once``, for cron jobs).

        Called from the main thread, SIGTERM and SIGINT stop the pass as they stop
        :meth:`run_until_signal`: no more claims, polls in flight finish and commit
        within :data:`SHUTDOWN_GRACE` or are abandoned, leases are released. The tags not
        reached stay due for the next pass; :attr:`stopping` tells the caller.
        """
        self._once_cutoff = self._clock()
        with _signals_call(self._on_signal):
            while not self.shutdown.stopping:
                # Renews the leases of the polls in flight, and claims what the pool can
                # take (nothing while a wrong key pauses polling: it would fail every
                # tag alike).
                self._claim_and_submit(self._clock())
                with self._lock:
                    futures = list(self._in_flight.values())
                if not futures:
                    break
                # Wake well before the leases run out even when every poll is long, or a
                # replica running `run` on the same database could claim a tag still
                # polled.
                wait(
                    futures,
                    timeout=self._lease.total_seconds() / 3,
                    return_when=FIRST_COMPLETED,
                )
            if self._stop_list is not None:  # after the polls: it never holds them up
                self.stats.stop_list = self._run_stop_list(self._stop_list.sync_if_stale)
            self._drain()
        return self.stats

    def start(self) -> None:
        """Start the dispatcher in the background (``run`` and the demo)."""
        scheduler = self._scheduler = BackgroundScheduler(timezone="UTC")

        def every(seconds: float, job: Callable[[], object], name: str) -> None:
            # One run at a time, missed runs merged into one, the first one now.
            scheduler.add_job(
                job,
                "interval",
                seconds=seconds,
                id=name,
                max_instances=1,
                coalesce=True,
                next_run_time=datetime.now().astimezone(),
            )

        every(self._interval, self.dispatch, "dispatch")
        if self._stop_list is not None:
            every(self._stop_list_tick, self._sync_stop_list, "stop_list")
        if self._maintenance is not None:
            every(MAINTENANCE_INTERVAL.total_seconds(), self._maintain, "maintenance")
        self._scheduler.start()
        self._notifier.notify("READY=1")
        log.info("daemon.started", owner=self.owner, concurrency=self._concurrency)

    def stop(self) -> None:
        """Stop claiming, let polls in flight finish and commit, release leases.

        Polls that cannot finish within :data:`SHUTDOWN_GRACE` are abandoned.
        """
        if self.shutdown.stopping:
            return
        self._begin_stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        self._drain()

    def _on_signal(self, name: str) -> None:
        """SIGTERM or SIGINT during ``run --once``: stop claiming (on the signal watcher's
        thread, see :mod:`daemon.signals`)."""
        log.info("daemon.signal", signal=name)
        self._begin_stop()

    def _begin_stop(self) -> None:
        """Stop claiming and start the grace of the polls in flight (also from the signal
        watcher's thread)."""
        if not self.shutdown.begin():
            return
        self._notifier.notify("STOPPING=1")
        log.info("daemon.stopping", in_flight=len(self._in_flight))

    def _drain(self) -> None:
        self._pool.shutdown(wait=True)
        try:
            with write_transaction(self._engine) as conn:
                tracking.release_leases(conn, owner=self.owner)
        except UNAVAILABLE_ERRORS as exc:
            log.warning("daemon.release_failed", error=str(exc.orig))

    def run_until_signal(self) -> None:
        """Start, block until SIGTERM or SIGINT, then stop cleanly."""
        received = threading.Event()

        def on_signal(name: str) -> None:
            log.info("daemon.signal", signal=name)
            received.set()

        # Kept for the rest of the process: a second SIGTERM during shutdown must not
        # kill it half-way.
        with SignalWatch(on_signal, keep=True):
            try:
                self.start()
                received.wait()
            finally:
                self.stop()
        # A clean stop only (an exception skips this): `check` must not call a daemon
        # that has exited healthy for the next minute.
        if self._heartbeat is not None and self._heartbeat_written is not None:
            remove_heartbeat(self._heartbeat, self._heartbeat_written)
        log.info("daemon.stopped", polls=self.stats.polls, failures=self.stats.failures)


@contextmanager
def _signals_call(action: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call ``action`` while the block runs (see :mod:`daemon.signals`),
    then the old handlers again; from the main thread only, the only one Python installs
    handlers from."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with SignalWatch(action):
        yield
