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
        return phones

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
