"""When the SMS Partner client may send its next request, and when to stop waiting.

Four timing decisions, kept apart from the HTTP conversation that
:mod:`daemon.smspartner` owns (it composes one :class:`Pacer` and asks it before each
page, each request and each retry):

* the client-side rate limit: requests evenly spaced, shared by every worker thread;
* the wait before a retry: ``Retry-After`` when the provider gave one (read here from the
  headers the client hands over), else full-jitter exponential backoff, both capped;
* the poll's budget (a :class:`Budget`, one per fetch): a page that would start after it,
  or a wait that would end after it, fails the poll with a
  :class:`~daemon.errors.TransientApiError` (recorded, backed off) rather than holding a
  worker thread; retries happen only if they fit in it;
* the shutdown deadline: when the daemon stops, it gives fetches a deadline (on the
  ``monotonic`` clock). Pages keep coming at the usual rate until then; a page that would
  start after it, or a wait (rate limit, retry) that would end after it, abandons the
  fetch with :class:`~daemon.errors.PollAbandoned`.

:meth:`Pacer.ends_at` gives the earlier of the last two, which the client also applies to
each request in flight (:mod:`daemon.watchdog`). Sleep and clock are injected, so tests
never wait for real.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import httpx
import tenacity

from daemon.errors import PollAbandoned, RateLimitedError, TransientApiError

__all__ = ["MAX_BACKOFF", "MAX_RETRY_AFTER", "Budget", "Pacer", "retry_after_seconds"]

#: Longest wait we accept from a ``Retry-After`` header; beyond it a poll would hold a
#: worker thread for too long, and the scheduler's own backoff takes over anyway.
MAX_RETRY_AFTER: Final = 300.0
#: Ceiling for the exponential backoff between retries, for the same reason.
MAX_BACKOFF: Final = 300.0


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """``Retry-After`` in seconds, from delta-seconds or an HTTP-date.

    An HTTP-date is measured against the response's own ``Date`` header when present
    (immune to our clock's skew), else against our UTC clock; a past date means 0.

    Args:
        headers: the response's headers (looked up case-insensitively).
    """
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is not a delay
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    server_date = headers.get("Date")
    if server_date:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            now = email.utils.parsedate_to_datetime(server_date)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class _TokenBucket:
    """A thread-safe token bucket holding one token: requests are evenly spaced.

    Each caller reserves the next free slot under the lock and waits outside it, so
    concurrent workers queue up one interval apart without holding the lock while they
    wait. A bucket of one (no burst) is the cautious choice for limits nobody documents.
    """

    def __init__(self, rate_per_second: float, *, monotonic: Callable[[], float]) -> None:
        self._interval = 1.0 / rate_per_second if rate_per_second > 0 else 0.0
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._next_free: float | None = None

    def acquire(self) -> float:
        """Reserve the next slot; return how long to wait for it (0 when the bucket is off).

        The caller sleeps (within its deadline and budget), not the bucket.
        """
        if self._interval <= 0:
            return 0.0
        with self._lock:
            now = self._monotonic()
            slot = now if self._next_free is None else max(now, self._next_free)
            self._next_free = slot + self._interval
        return slot - now


def _no_deadline() -> float | None:
    return None


@dataclass(frozen=True, slots=True)
class Budget:
    """How long one poll's fetch may take, pages, retries and waits included.

    Attributes:
        seconds: the budget, for messages.
        ends_at: when it is spent, on the pacer's ``monotonic`` clock.
    """

    seconds: float
    ends_at: float


class Pacer:
    """Spaces a client's requests and bounds every wait by the shutdown deadline.

    Shared by the poller's thread pool: the only mutable state (the rate limiter) is
    locked.

    Args:
        rate_per_second: client-side request rate; 0 or less turns it off.
        retry_backoff: base of the full-jitter exponential backoff, in seconds.
        sleep: may return early (the daemon's does when shutdown begins): the wait is
            then checked against the deadline again and the rest of it slept.
        monotonic: the clock for the rate limiter and the deadline.
        deadline: returns when a fetch must be over, on the ``monotonic`` clock, or
            None while there is no deadline. None, the default, means never.
    """

    def __init__(
        self,
        rate_per_second: float,
        *,
        retry_backoff: float,
        sleep: Callable[[float], None],
        monotonic: Callable[[], float],
        deadline: Callable[[], float | None] | None = None,
    ) -> None:
        self._retry_backoff = max(0.0, retry_backoff)
        self._sleep = sleep
        self._monotonic = monotonic
        self._deadline = deadline or _no_deadline
        self._bucket = _TokenBucket(rate_per_second, monotonic=monotonic)

    def budget(self, seconds: float) -> Budget:
        """A poll's budget of ``seconds``, starting now."""
        return Budget(seconds, self._monotonic() + seconds)

    def ends_at(self, budget: Budget | None = None) -> float:
        """When work must be over: the earlier of the shutdown deadline and the budget's
        end (``math.inf`` when neither applies)."""
        deadline = self._deadline()
        ends = math.inf if deadline is None else deadline
        return ends if budget is None else min(ends, budget.ends_at)

    def stopping(self) -> bool:
        """Whether the shutdown deadline has passed."""
        deadline = self._deadline()
        return deadline is not None and self._monotonic() >= deadline

    def before_page(self, page: int, budget: Budget | None = None) -> None:
        """Check that ``page`` may still start.

        Checked between pages too, so a long fetch stops in time even when nothing
        sleeps (rate limit off, or its slot already free).

        Raises:
            PollAbandoned: the page would start after the shutdown deadline.
            TransientApiError: the page would start after the budget is spent.
        """
        self._abandon_if_late(self._monotonic(), f"page {page} would start", budget)

    def before_request(self, budget: Budget | None = None) -> None:
        """Wait for the rate limiter's next free slot, within the deadline and budget.

        Raises:
            PollAbandoned: the wait would end after the shutdown deadline.
            TransientApiError: the wait would end after the budget is spent.
        """
        wait = self._bucket.acquire()
        if wait > 0:
            self.pause(wait, budget)

    def before_retry(self, wait: float, budget: Budget | None = None) -> None:
        """Check that a retry ``wait`` seconds from now would still come in time.

        Raises:
            PollAbandoned: the retry would come after the shutdown deadline.
            TransientApiError: the retry would come after the budget is spent.
        """
        moment = self._monotonic() + wait
        self._abandon_if_late(moment, f"a retry in {wait:.1f} s would come", budget)

    def retry_wait(self, retry_state: tenacity.RetryCallState) -> float:
        """``Retry-After`` exactly when the provider gave one, else full-jitter backoff."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        ceiling = min(self._retry_backoff * 2 ** (retry_state.attempt_number - 1), MAX_BACKOFF)
        return random.uniform(0.0, ceiling)

    def pause(self, seconds: float, budget: Budget | None = None) -> None:
        """Sleep ``seconds`` (the rate limit, a retry) unless it would end too late.

        Raises:
            PollAbandoned: the wait would end after the shutdown deadline, known before
                or during it.
            TransientApiError: the wait would end after the budget is spent.
        """
        wake_at = self._monotonic() + seconds
        what = f"a wait of {seconds:.1f} s would end"
        self._abandon_if_late(wake_at, what, budget)
        self._sleep(seconds)
        if self._deadline() is not None:
            # The daemon's sleep returns early when shutdown begins: decide again, now
            # that the deadline is known, and sleep the rest.
            self._abandon_if_late(wake_at, what, budget)
            rest = wake_at - self._monotonic()
            if rest > 0:
                self._sleep(rest)

    def _abandon_if_late(self, moment: float, what: str, budget: Budget | None) -> None:
        """Raise when ``moment`` is past the shutdown deadline or the budget's end."""
        deadline = self._deadline()
        if deadline is not None and moment > deadline:
            raise PollAbandoned(f"the daemon is stopping: {what} after its shutdown deadline")
        if budget is not None and moment > budget.ends_at:
            raise TransientApiError(
                f"the poll's budget of {budget.seconds:g} s is spent: {what} after it"
            )
