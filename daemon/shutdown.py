"""The stop of a run, as one object handed to whatever must stop.

``run`` stops on SIGTERM/SIGINT: the scheduler stops claiming, the API client's waits
(rate limit, retry backoff) return early and every fetch learns when it must be over,
the retention job stops between batches. They all watch one :class:`Shutdown`, built by
the composition root (:mod:`daemon.app`) before any of them, so none of them needs a
reference to another to learn that the run is ending.

Standard library only: ``check`` and ``--help`` import nothing heavy through it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: How long polls in flight may go on after SIGTERM: the daemon must exit 0 within 10 s
#: of the signal (design.md), and the 2 s left are for the last commits, releasing the
#: leases and exiting. A poll that cannot end by then is abandoned between two pages,
#: before a wait (rate limit, retry) that would cross it, or, when a request is still under
#: way at it, by cutting that request's connection (see daemon/watchdog.py).
SHUTDOWN_GRACE = 8.0


class Shutdown:
    """A stop event with a deadline and an interruptible sleep.

    Args:
        grace: seconds from :meth:`begin` to the deadline of the work in flight.
        monotonic: the clock of the deadline (the API client's ``monotonic``).
    """

    def __init__(
        self, grace: float = SHUTDOWN_GRACE, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._grace = grace
        self._monotonic = monotonic
        self._event = threading.Event()
        self._deadline: float | None = None

    def begin(self) -> bool:
        """Start the stop (also from a signal handler: nothing here waits for a lock).

        Returns:
            True the first time, False when the stop had already begun.
        """
        if self._event.is_set():
            return False
        # Before the event: a sleeping poll woken by it must find the deadline set.
        self._deadline = self._monotonic() + self._grace
        self._event.set()
        return True

    @property
    def stopping(self) -> bool:
        """True once the stop began."""
        return self._event.is_set()

    def deadline(self) -> float | None:
        """When work in flight must be over (on ``monotonic``), or None before the stop.

        The API client's ``deadline``.
        """
        return self._deadline

    def sleep(self, seconds: float) -> None:
        """Sleep, returning early when the stop begins (once).

        The API client's ``sleep``: woken early, it checks whether its wait still ends
        before :meth:`deadline` and, if so, sleeps the rest, a plain sleep by then.
        """
        if self._event.is_set():
            time.sleep(seconds)
        else:
            self._event.wait(seconds)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the stop begins or ``timeout`` passes; True when stopping."""
        return self._event.wait(timeout)
