"""One poll's diff: which of its merged reports change what is stored, and what writing
them means (rows to upsert, status events, new opt-outs, the tag's counts after it).

Pure: no connection, no clock. The store reads the stored states, calls
:func:`diff_reports` and writes what it returns (:func:`daemon.store.apply_reports`).
Values go out in the driver's form (the ``to_db`` given), as flat lists, row after row
(see :func:`daemon.sql.bulk`): a large poll builds no tuple per row.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from daemon.status import FINAL, PROVIDER_FINAL, Report, Status, status_advances, supersedes

#: The columns of a row to upsert into ``delivery_statuses``, in :attr:`Diff.rows` order.
STATUS_KEYS = (
    "tag", "phone_number", "status", "provider_status", "stop_sms", "reported_at",
    "first_seen_at", "resolved_at", "updated_at",
)  # fmt: skip
#: The columns of a ``delivery_status_events`` row, in :attr:`Diff.events` order.
EVENT_KEYS = ("tag", "phone_number", "old_status", "new_status", "reported_at", "observed_at")

#: What is stored for one number, as the driver returns it:
#: ``(phone_number, status, stop_sms, reported_at)``.
StoredState = tuple[Any, ...]

# Dict lookups are much cheaper than Status(text) and .value on every row of a large poll.
_STATUS_BY_VALUE = {s.value: s for s in Status}
_VALUE_OF = {s: s.value for s in Status}


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Tally:
    """A tag's numbers per status, and how many answered STOP."""

    counts: Mapping[str, int]
    stop_sms: int


@dataclass(frozen=True, slots=True)
class Diff:
    """What one poll's reports change, ready to write."""

    #: Rows to upsert, flat, :data:`STATUS_KEYS` after :data:`STATUS_KEYS`.
    rows: list[Any]
    #: Status events to insert, flat, :data:`EVENT_KEYS` after :data:`EVENT_KEYS`.
    events: list[Any]
    #: The tag had nothing stored: the first sightings' events are not in :attr:`events`,
    #: the database copies them from the rows it just inserted (there are as many as
    #: :attr:`first_seen`).
    copy_first_sightings: bool
    #: Numbers seen for the first time.
    first_seen: int
    #: Rows for ``stop_sms_optouts``: numbers whose STOP this poll is the first to see.
    optouts: list[dict[str, Any]]
    #: Provider dates of numbers that got their first provider-final status (metrics).
    newly_final: list[datetime | None]
    #: The tag's counts once the rows are written.
    tally: Tally

    @property
    def changed(self) -> int:
        """Numbers written (new, or changed by the forward-only rule)."""
        return len(self.rows) // len(STATUS_KEYS)

    @property
    def event_count(self) -> int:
        """Status events this poll writes, the copied first sightings included."""
        copied = self.first_seen if self.copy_first_sightings else 0
        return len(self.events) // len(EVENT_KEYS) + copied


def tally_of(stored: Mapping[str, StoredState]) -> Tally:
    """The counts of a tag whose every stored number is in ``stored``."""
    counts = Counter(map(operator.itemgetter(1), stored.values()))
    return Tally(dict(counts), sum(map(operator.itemgetter(2), stored.values())))


def diff_reports(
    tag: str,
    reports: Mapping[str, Report],
    stored: Mapping[str, StoredState],
    *,
    tally: Tally | None,
    now: datetime,
    to_db: Callable[[datetime | None], Any] = _same,
    from_db: Callable[[Any], datetime | None] = _same,
) -> Diff:
    """Compare one poll's merged ``reports`` with what is ``stored`` for them.

    A number not in ``stored`` is new; one whose stored values equal the report's is
    unchanged (equal values can never supersede); any other is written only when the
    report supersedes what is stored (:func:`daemon.status.supersedes`), and gets an
    event only when its status moves (:func:`daemon.status.status_advances`).

    Args:
        tag: the tag polled.
        reports: the poll's reports, one per number (:func:`daemon.status.merge_reports`).
        stored: what is stored, by number, for at least the numbers of ``reports``.
        tally: the tag's counts as they stand; None when ``stored`` holds the whole tag
            (then they are counted from it).
        now: the poll's time: first seen, resolved, updated and observed.
        to_db: a datetime (or None) → the driver's form; ``stored`` dates are in it.
        from_db: the driver's form of a stored date → aware datetime (or None).
    """
    new_tag = tally is None and not stored
    before = tally_of(stored) if tally is None else tally
    counts = Counter(before.counts)
    now_db = to_db(now)
    value, by_value = _VALUE_OF, _STATUS_BY_VALUE
    # A campaign's reports share few distinct seconds: convert each once.
    dates = {when: to_db(when) for when in {new.reported_at for new in reports.values()}}
    resolved = {status: now_db if status in FINAL else None for status in Status}
    fresh: list[Report] = []  # numbers seen for the first time
    changed: list[tuple[Report, Report]] = []  # (new, old) where new supersedes old
    if not stored:  # a tag's first poll, or only new numbers: nothing to compare
        fresh = list(reports.values())
    else:
        for phone, new in reports.items():
            row = stored.get(phone)
            if row is None:
                fresh.append(new)
            elif row != (phone, value[new.status], new.stop_sms, dates[new.reported_at]):
                old = Report(phone, by_value[row[1]], "", bool(row[2]), from_db(row[3]))
                if supersedes(new, old):
                    changed.append((new, old))

    moved = [(new, old) for new, old in changed if status_advances(new, old)]
    rows: list[Any] = []
    add_row = rows.extend
    for phone, status, provider, stop, reported in fresh + [new for new, _ in changed]:
        add_row((tag, phone, value[status], provider, stop, dates[reported], now_db,
                 resolved[status], now_db))  # fmt: skip
    # On a re-poll the few new numbers' first sightings are sent along, rather than
    # having the database scan the whole tag for them.
    events: list[Any] = []
    add_event = events.extend
    for phone, status, _, _, reported in [] if new_tag else fresh:
        add_event((tag, phone, None, value[status], dates[reported], now_db))
    for new, old in moved:
        if new.status is not old.status:
            add_event((tag, new.phone_number, value[old.status], value[new.status],
                       dates[new.reported_at], now_db))  # fmt: skip
    counts.update(value[new.status] for new in fresh)
    counts.subtract(value[old.status] for _, old in moved)
    counts.update(value[new.status] for new, _ in moved)
    optouts = [
        {"phone_number": new.phone_number, "tag": tag, "reported_at": new.reported_at,
         "first_seen_at": now}
        for new in fresh + [new for new, old in changed if not old.stop_sms]
        if new.stop_sms
    ]  # fmt: skip
    return Diff(
        rows=rows,
        events=events,
        copy_first_sightings=new_tag and bool(fresh),
        first_seen=len(fresh),
        optouts=optouts,
        newly_final=[new.reported_at for new in fresh if new.status in PROVIDER_FINAL]
        + [
            new.reported_at
            for new, old in moved
            if new.status in PROVIDER_FINAL and old.status not in PROVIDER_FINAL
        ],
        tally=Tally(
            {status: n for status, n in counts.items() if n}, before.stop_sms + len(optouts)
        ),
    )
