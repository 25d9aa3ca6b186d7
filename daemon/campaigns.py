"""What the simulator serves: tags of numbers whose delivery reports arrive over time.

Each number added with :meth:`Campaigns.add_tag` gets a report delay (most within
seconds, a tail over hours, a few never) and a final outcome, drawn from a generator
seeded by ``(seed, tag, batch)``, so a run can be replayed. What a page holds depends
only on the moment asked, so a test can jump to "48 hours later" without waiting. Raw
items (:meth:`Campaigns.set_items`, :meth:`Campaigns.set_number`) are served verbatim,
malformed or not: they are how tests reproduce the provider's undocumented shapes.

:class:`daemon.simulator.Simulator` adds the clock, the faults and the HTTP server.
"""

from __future__ import annotations

import copy
import math
import random
import threading
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_WINDOW = 48 * 3600.0  # the provider's report window, in seconds


@dataclass
class _TagState:
    """What one tag serves: generated numbers (evolving), then extra raw items.

    Generated numbers live in parallel lists rather than objects so that 100,000 of them
    stay cheap to build and a page is a slice.
    """

    page_size: int | None = None
    batches: int = 0
    phones: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    sent_dates: list[str] = field(default_factory=list)
    resolve_at: list[float] = field(default_factory=list)  # epoch seconds; inf = never
    final_status: list[str] = field(default_factory=list)
    final_stop: list[bool] = field(default_factory=list)
    final_dates: list[str] = field(default_factory=list)
    overrides: dict[int, dict[str, object]] = field(default_factory=dict)
    extra: list[Any] = field(default_factory=list)  # served verbatim, malformed or not
    # The account's STOP list: numbers that opted out without a stopSMS in their report
    # (a STOP on day three, one added by hand), and when listed numbers were removed.
    late_stop: dict[int, float] = field(default_factory=dict)  # index → listed at
    unlisted: dict[int, float] = field(default_factory=dict)  # index → removed at
    stop_candidates: list[int] = field(default_factory=list)  # indices ever listed

    def __len__(self) -> int:
        return len(self.phones) + len(self.extra)

    def items(self, start: int, stop: int, t: float) -> list[Any]:
        """The items at positions ``[start, stop)`` as served at epoch second ``t``."""
        out: list[Any] = []
        n_gen = len(self.phones)
        phones, resolve, overrides = self.phones, self.resolve_at, self.overrides
        for i in range(start, min(stop, n_gen)):
            item = overrides.get(i)
            if item is None:
                if t >= resolve[i]:
                    item = {
                        "phoneNumber": phones[i],
                        "status": self.final_status[i],
                        "stopSMS": self.final_stop[i],
                        "date": self.final_dates[i],
                    }
                else:
                    item = {
                        "phoneNumber": phones[i],
                        "status": "Waiting",
                        "stopSMS": False,
                        "date": self.sent_dates[i],
                    }
            out.append(item)
        out.extend(self.extra[max(start - n_gen, 0) : max(stop - n_gen, 0)])
        return out


def as_utc(moment: datetime) -> datetime:
    """``moment`` as aware UTC; a naive one is taken as UTC."""
    # A naive datetime is taken as UTC: the clock seam is documented as aware UTC, and a
    # test tool that guesses the local zone would be wrong on half the CI machines.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _truthy(value: object) -> bool:
    # The provider's stopSMS drifts between bool and "0"/"1"; truth() reports a bool.
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes"}
    return bool(value) if isinstance(value, bool | int) else False


class Campaigns:
    """The tags served, each a list of numbers and raw items; thread-safe.

    Args:
        seed: Seeds phone numbers, delays and outcomes, for replayable runs.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self._lock = threading.RLock()
        self._tags: dict[str, _TagState] = {}
        #: STOP list entries set by hand: phone → (listed at, removed at or None).
        self._manual_stops: dict[str, tuple[float, float | None]] = {}
        self._stop_items: list[Any] | None = None  # served verbatim when set
        self._stop_ids: dict[str, int] = {}

    def now(self) -> datetime:
        """The moment a default ``sent_at``, ``date`` or ``at`` means; the simulator
        overrides it with its simulated clock."""
        return datetime.now(UTC)

    def add_tag(
        self,
        tag: str,
        count: int,
        *,
        sent_at: datetime | None = None,
        page_size: int | None = None,
        prefix: str = "+3361",
    ) -> list[str]:
        """Send ``count`` messages under ``tag``: numbers whose reports arrive over time.

        Calling it again for the same tag adds another batch (new numbers, their own
        ``sent_at``), as an application sending twice under one tag would.

        Args:
            tag: The tag, served exactly as given.
            count: How many numbers to add.
            sent_at: Send time; defaults to the simulated now.
            page_size: Overrides the simulator's page size for this tag.
            prefix: Start of the phone numbers; digits are appended up to 12 characters
                (``+33612345678``), as French mobile numbers are.

        Returns:
            The new phone numbers, in the order they are served.

        Raises:
            ValueError: On a negative count, a page size below 1, or more numbers than the
                prefix leaves room for.
        """
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        if page_size is not None and page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        sent = as_utc(sent_at or self.now()).timestamp()
        sent_date = str(int(sent))
        width = max(12 - len(prefix), 1)
        with self._lock:
            state = self._tags.setdefault(tag, _TagState())
            if page_size is not None:
                state.page_size = page_size
            taken = set(state.index) | {
                item["phoneNumber"]
                for item in state.extra
                if isinstance(item, dict) and isinstance(item.get("phoneNumber"), str)
            }
            if count + len(taken) > 10**width:
                raise ValueError(f"prefix {prefix!r} leaves room for only {10**width} numbers")
            # Seeded by (seed, tag, batch): the same call replays the same numbers and story.
            rng = random.Random(f"{self.seed}\x00{tag}\x00{state.batches}")
            # Its own generator, so adding the STOP list changed none of the reports.
            stop_rng = random.Random(f"{self.seed}\x00{tag}\x00{state.batches}\x00stop-list")
            state.batches += 1
            phones: list[str] = []
            for n in rng.sample(range(10**width), count + len(taken)):
                phone = f"{prefix}{n:0{width}d}"
                if phone not in taken:
                    phones.append(phone)
                    if len(phones) == count:
                        break
            for phone in phones:
                delay, status, stop = self._draw_report(rng)
                state.index[phone] = len(state.phones)
                state.phones.append(phone)
                state.sent_dates.append(sent_date)
                state.resolve_at.append(sent + delay)
                state.final_status.append(status)
                state.final_stop.append(stop)
                state.final_dates.append(str(int(sent + delay)) if math.isfinite(delay) else "")
                self._draw_stop_listing(state, stop_rng, sent)
        return phones

    @staticmethod
    def _draw_stop_listing(state: _TagState, rng: random.Random, sent: float) -> None:
        """Draw how the number just added appears on the account's STOP list: with its
        report's stopSMS; for a few, a STOP after the report window or added by hand
        (1 to 72 hours after sending); and for a tenth of those listed, a removal."""
        index = len(state.phones) - 1
        listed = state.resolve_at[index] if state.final_stop[index] else math.inf
        if rng.random() < 0.005:
            listed = min(listed, sent + rng.uniform(3600, 72 * 3600))
            state.late_stop[index] = listed
        if math.isfinite(listed):
            state.stop_candidates.append(index)
            if rng.random() < 0.1:
                state.unlisted[index] = listed + rng.uniform(3600, 48 * 3600)

    @staticmethod
    def _draw_report(rng: random.Random) -> tuple[float, str, bool]:
        """Draw one number's report delay (seconds; inf = never), final status and stop."""
        u = rng.random()
        if u < 0.80:  # the usual case: a report within seconds
            delay = min(rng.expovariate(1 / 10), 59.0)
        elif u < 0.97:  # a tail from minutes to many hours, median 20 minutes
            delay = min(max(rng.lognormvariate(math.log(1200), 1.5), 60.0), _WINDOW - 600)
        else:  # the report never comes: Waiting until the window closes
            delay = math.inf
        outcome = rng.random()
        if outcome < 0.96:
            return delay, "Delivered", rng.random() < 0.01
        return delay, ("Not delivered" if outcome < 0.99 else "ko"), False

    def set_items(
        self, tag: str, items: list[dict[str, object]], *, page_size: int | None = None
    ) -> None:
        """Serve exactly these items for ``tag`` (a deep copy), replacing everything else.

        Nothing is validated: wrong types, missing fields and non-dict entries are served
        as given, which is the point (the client must skip them one by one).

        Args:
            tag: The tag, created if needed.
            items: The raw ``StatutResponse_List`` entries, served in order.
            page_size: Overrides the simulator's page size for this tag.
        """
        state = _TagState(page_size=page_size, extra=copy.deepcopy(items))
        with self._lock:
            old = self._tags.get(tag)
            if old is not None:
                state.batches = old.batches  # a later add_tag still draws a fresh batch
                state.page_size = page_size or old.page_size
            self._tags[tag] = state

    def set_number(
        self,
        tag: str,
        phone: str,
        status: str,
        *,
        date: int | str | None = None,
        stop_sms: bool | str = False,
    ) -> None:
        """Serve a fixed item for ``phone`` under ``tag``, replacing its current one.

        A number not yet in the tag is appended; the tag is created if needed. Values are
        served as given, so ``date=1517989111`` (an int) or ``stop_sms="1"`` reproduce
        the provider's type drift; pass strings and bools for the documented shape.

        Args:
            tag: The tag.
            phone: The ``phoneNumber`` to add or override.
            status: The status text, any case or spelling.
            date: The ``date`` field; defaults to the simulated now in Unix seconds.
            stop_sms: The ``stopSMS`` field.
        """
        item: dict[str, object] = {
            "phoneNumber": phone,
            "status": status,
            "stopSMS": stop_sms,
            "date": str(int(self.now().timestamp())) if date is None else date,
        }
        with self._lock:
            state = self._tags.setdefault(tag, _TagState())
            position = state.index.get(phone)
            if position is not None:
                state.overrides[position] = item
                return
            for i, existing in enumerate(state.extra):
                if isinstance(existing, dict) and existing.get("phoneNumber") == phone:
                    state.extra[i] = item
                    return
            state.extra.append(item)

    def truth(self, tag: str, at: datetime | None = None) -> dict[str, tuple[str, bool, str]]:
        """What the tag serves at ``at``, for comparing with what the daemon stored.

        Raw items without a string ``phoneNumber`` are left out; when a number appears
        twice, the later item wins.

        Args:
            tag: A tag known to the simulator.
            at: The simulated moment; defaults to :meth:`now`.

        Returns:
            ``phone -> (status text, stopSMS as bool, date string)``.

        Raises:
            KeyError: If the tag is unknown (a typo should not compare equal to nothing).
        """
        t = as_utc(at or self.now()).timestamp()
        with self._lock:
            state = self._tags[tag]
            items = state.items(0, len(state), t)
        result: dict[str, tuple[str, bool, str]] = {}
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("phoneNumber"), str):
                date = item.get("date")
                result[item["phoneNumber"]] = (
                    str(item.get("status")),
                    _truthy(item.get("stopSMS")),
                    "" if date is None else str(date),
                )
        return result


# --- the account's STOP list ---------------------------------------------------------------

#: The provider's local time, in which ``createdAt`` is written.
PROVIDER_TIMEZONE = "Europe/Paris"


class StopList(Campaigns):
    """The account's STOP list (``GET /stop-sms/list``) over the campaigns: each number
    whose report says ``stopSMS`` (listed when the report arrives), a few more that
    opted out another way (late, or by hand), a tenth of them removed later, and the
    numbers tests add or remove by hand. Entries are served oldest first, with
    ``createdAt`` in Paris local time and a stable ``id`` per number."""

    def add_stop_number(self, phone: str, *, at: datetime | None = None) -> None:
        """List ``phone`` from ``at`` (default now), again if it was removed."""
        listed = as_utc(at or self.now()).timestamp()
        with self._lock:
            self._manual_stops[phone] = (listed, None)

    def remove_stop_number(self, phone: str, *, at: datetime | None = None) -> None:
        """Remove ``phone`` from the list from ``at`` (default now).

        Raises:
            KeyError: the number is not listed at ``at``.
        """
        moment = as_utc(at or self.now())
        listed = dict(self.stop_list(moment))[phone]
        with self._lock:
            self._manual_stops[phone] = (listed.timestamp(), moment.timestamp())

    def set_stop_list_items(self, items: list[Any] | None) -> None:
        """Serve exactly these raw ``data`` items (a deep copy; ``nbData`` is their
        count), malformed or not; None serves the generated list again."""
        with self._lock:
            self._stop_items = None if items is None else copy.deepcopy(items)

    def stop_list(self, at: datetime | None = None) -> list[tuple[str, datetime]]:
        """The numbers listed at ``at`` (default now), oldest first: ``(phone, listed at)``."""
        t = as_utc(at or self.now()).timestamp()
        listed: dict[str, float] = {}
        with self._lock:
            for state in self._tags.values():
                for i in state.stop_candidates:
                    when = min(
                        state.resolve_at[i] if state.final_stop[i] else math.inf,
                        state.late_stop.get(i, math.inf),
                    )
                    if when <= t < state.unlisted.get(i, math.inf):
                        phone = state.phones[i]
                        listed[phone] = min(when, listed.get(phone, math.inf))
            for phone, (since, until) in self._manual_stops.items():
                listed.pop(phone, None)
                if since <= t and (until is None or t < until):
                    listed[phone] = since
            ordered = sorted(listed.items(), key=lambda item: (item[1], item[0]))
            for phone, _ in ordered:
                self._stop_ids.setdefault(phone, len(self._stop_ids) + 1)
        return [(phone, datetime.fromtimestamp(since, UTC)) for phone, since in ordered]

    def stop_list_items(self, at: datetime | None = None) -> list[Any]:
        """The raw ``data`` items served at ``at``: the override, or the list."""
        with self._lock:
            if self._stop_items is not None:
                return copy.deepcopy(self._stop_items)
        zone = zoneinfo.ZoneInfo(PROVIDER_TIMEZONE)
        entries = self.stop_list(at)
        with self._lock:
            return [
                {
                    "id": self._stop_ids[phone],
                    "phoneNumber": phone,
                    "createdAt": since.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S"),
                }
                for phone, since in entries
            ]
