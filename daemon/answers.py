"""What the daemon remembers of each large active tag's last answer, so that a re-poll
merges, diffs and reads back only the numbers whose report changed.

The provider sends every number of a tag on every poll, so a large tag's re-poll would
otherwise merge, diff and read back every number to write the few that changed. A
report the store has already applied cannot change anything: statuses only move
forward, so the stored row holds that report's effect or a later one.
After each committed poll of a large active tag, the poller therefore keeps each
number's last report (the merged dict the poll built anyway) and the tag's counts; the
next poll's parser leaves out the items that read as those reports, and the store reads
back only the numbers that remain.

An entry holds only while nothing else has written the tag: it carries the tag row's
``(poll_count, updated_at)`` as its poll committed them, and every other writer of the
tag changes them (a poll by another replica or by ``poll``, ``track``, ``untrack``, the
window fill). The poller checks the marker before it fetches and again under the tag's
lock, and drops the entry when it moved. Hand edits of ``delivery_statuses`` do not move
it: after one, restart the daemon (or ``track`` the tag again) so the next poll compares
every number.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy.engine import RowMapping

from daemon.diff import Tally
from daemon.status import Report

#: Below this many numbers a tag is not remembered: reading it back costs less than
#: the check that an entry still holds.
MIN_NUMBERS: Final = 1_000
#: At most this many numbers are remembered over all tags (~200 bytes each: a report,
#: its number, a dict entry); the least recently polled tags go first.
MAX_NUMBERS: Final = 500_000

Marker = tuple[int, datetime]


def marker(row: Mapping[str, Any] | RowMapping) -> Marker:
    """A ``tracked_tags`` row's ``(poll_count, updated_at)``: what every writer changes."""
    return (row["poll_count"], row["updated_at"])


@dataclass(frozen=True, slots=True)
class Answer:
    """One tag's last committed answer."""

    #: The tag row's :func:`marker` as that poll committed it.
    marker: Marker
    #: Each number's report, as that poll (or an earlier one) applied it.
    reports: Mapping[str, Report]
    #: The tag's counts after that poll.
    tally: Tally


class Answers:
    """Remembered answers by tag, bounded by their numbers; safe across worker threads."""

    def __init__(self, *, min_numbers: int = MIN_NUMBERS, max_numbers: int = MAX_NUMBERS) -> None:
        self._min_numbers = min_numbers
        self._max_numbers = max_numbers
        self._entries: dict[str, Answer] = {}  # least recently remembered first
        self._numbers = 0
        self._lock = threading.Lock()

    def get(self, tag: str) -> Answer | None:
        """The tag's entry, if one is kept (its marker is the caller's to check)."""
        return self._entries.get(tag)

    def remember(self, tag: str, answer: Answer) -> None:
        """Keep ``answer`` for ``tag`` (small tags are not kept), evicting the oldest."""
        with self._lock:
            self._drop(tag)
            size = len(answer.reports)
            if not self._min_numbers <= size <= self._max_numbers:
                return
            while self._numbers + size > self._max_numbers:
                self._drop(next(iter(self._entries)))
            self._entries[tag] = answer
            self._numbers += size

    def forget(self, tag: str) -> None:
        """Drop the tag's entry: its next poll compares every number."""
        with self._lock:
            self._drop(tag)

    def _drop(self, tag: str) -> None:
        old = self._entries.pop(tag, None)
        if old is not None:
            self._numbers -= len(old.reports)
