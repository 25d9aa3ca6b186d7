"""When the SMS Partner client may send its next request, and when to stop waiting.

Three timing decisions, kept apart from the HTTP conversation that
:mod:`daemon.smspartner` owns (it composes one :class:`Pacer` and asks it before each
page, each request and each retry):

* the client-side rate limit: requests evenly spaced, shared by every worker thread;
* the wait before a retry: ``Retry-After`` when the provider gave one (read here from the
  headers the client hands over), else full-jitter exponential backoff, both capped;
* the shutdown deadline: when the daemon stops, it gives fetches a deadline (on the
  ``monotonic`` clock). Pages keep coming at the usual rate until then; a page that would
  start after it, or a wait (rate limit, retry) that would end after it, abandons the
  fetch with :class:`~daemon.errors.PollAbandoned`.

Sleep and clock are injected, so tests never wait for real.
"""

from __future__ import annotations

import contextlib
import email.utils
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import httpx
import tenacity

from daemon.errors import PollAbandoned, RateLimitedError

__all__ = ["MAX_BACKOFF", "MAX_RETRY_AFTER", "Pacer", "retry_after_seconds"]

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

    Each caller reserves the next free slot under the lock and sleeps outside it, so
    concurrent workers queue up one interval apart without holding the lock while they
    wait. A bucket of one (no burst) is the cautious choice for limits nobody documents.
    """

    def __init__(
        self,
        rate_per_second: float,
        *,
        sleep: Callable[[float], None],
        monotonic: Callable[[], float],
    ) -> None:
        self._interval = 1.0 / rate_per_second if rate_per_second > 0 else 0.0
        self._sleep = sleep
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._next_free: float | None = None

    def acquire(self) -> float:
        """Wait for a token; return how long we waited (0 when the bucket is off)."""
        if self._interval <= 0:
            return 0.0
        with self._lock:
            now = self._monotonic()
            slot = now if self._next_free is None else max(now, self._next_free)
            self._next_free = slot + self._interval
        wait = slot - now
        if wait > 0:
            self._sleep(wait)
        return wait


def _no_deadline() -> float | None:
    return None


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
        self._bucket = _TokenBucket(rate_per_second, sleep=self.pause, monotonic=monotonic)

    def before_page(self, page: int) -> None:
        """Check that ``page`` may still start.

        Checked between pages too, so a long fetch stops in time even when nothing
        sleeps (rate limit off, or its slot already free).

        Raises:
            PollAbandoned: the page would start after the deadline.
        """
        self._abandon_if_late(self._monotonic(), f"page {page} would start")

    def before_request(self) -> None:
        """Wait for the rate limiter's next free slot, within the deadline.

        Raises:
            PollAbandoned: the wait would end after the deadline.
        """
        self._bucket.acquire()

    def before_retry(self, wait: float) -> None:
        """Check that a retry ``wait`` seconds from now would still come in time.

        Raises:
            PollAbandoned: the retry would come after the deadline.
        """
        self._abandon_if_late(self._monotonic() + wait, f"a retry in {wait:.1f} s would come")

    def retry_wait(self, retry_state: tenacity.RetryCallState) -> float:
        """``Retry-After`` exactly when the provider gave one, else full-jitter backoff."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        ceiling = min(self._retry_backoff * 2 ** (retry_state.attempt_number - 1), MAX_BACKOFF)
        return random.uniform(0.0, ceiling)

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (the rate limit, a retry) unless it would end past the deadline.

        Raises:
            PollAbandoned: the wait would end after the deadline, known before or during it.
        """
        wake_at = self._monotonic() + seconds
        self._abandon_if_late(wake_at, f"a wait of {seconds:.1f} s would end")
        self._sleep(seconds)
        if self._deadline() is not None:
            # The daemon's sleep returns early when shutdown begins: decide again, now
            # that the deadline is known, and sleep the rest.
            self._abandon_if_late(wake_at, f"a wait of {seconds:.1f} s would end")
            rest = wake_at - self._monotonic()
            if rest > 0:
                self._sleep(rest)

    def _abandon_if_late(self, moment: float, what: str) -> None:
        """Raise :class:`PollAbandoned` when ``moment`` is past the deadline, if any."""
        deadline = self._deadline()
        if deadline is not None and moment > deadline:
            raise PollAbandoned(f"the daemon is stopping: {what} after its shutdown deadline")
