"""The account's STOP list (``GET /stop-sms/list``), read tolerantly; pure, no I/O.

SMS Partner keeps one list of the account's opted-out numbers::

    {"success": true, "code": 200, "nbData": 1,
     "data": [{"id": 19, "phoneNumber": "+33xxxxxxxxx", "createdAt": "2015-07-20 10:19:45"}]}

Errors come as for ``bulk-status-by-tag`` (code 1: key missing, code 10: key wrong), which
is why :class:`StopListEnvelope` extends that endpoint's envelope. The HTTP around it is
:meth:`daemon.smspartner.SmsPartnerClient.fetch_stop_list`'s; writing what was read is
:mod:`daemon.stoplist_sync`'s.

**Pages.** Pagination is not documented. We send ``page=1,2,…`` and, after each page
(:meth:`StopListPages.add_page`), stop when ``nbData`` items have arrived, at an empty
page, at a page that brings no number not already seen (a server ignoring ``page``), or
at ``MAX_PAGES``. Without ``nbData``, or once more items came than it says the list
holds (a count that lies), only the pages themselves can end the list (an empty page,
or one of repeats). Removing a number from our copy because a sync did not
list it is only safe when the answer is known to be whole, so an answer is *complete*
only when it ended on its own and its items reached ``nbData``; these are not:

* ``max_pages``: the cap came first (the list may go on);
* ``empty_page`` or ``no_new_numbers`` before ``nbData`` items arrived (a server
  ignoring ``page`` over a long list);
* ``list_changed``: ``nbData`` differed between pages (numbers added or removed while we
  paged shift the pages under us, so one number may have been skipped);
* ``unreadable_page``: a page whose every item was malformed, or a success without
  ``data``: an answer like that must not read as "the list is empty".

**Times.** ``createdAt`` carries no zone: it is the provider's local time,
``SMSPARTNER_PROVIDER_TIMEZONE`` (``Europe/Paris``). It is read with :mod:`zoneinfo`,
so winter (UTC+1) and summer (UTC+2) times are each turned into the right UTC instant.
Around the changes of time one local hour is ambiguous (autumn: 02:00–03:00 happens
twice) or missing (spring: 02:00–03:00 never happens); we take ``fold=0`` in both cases,
Python's default: the first of the two ambiguous instants (still summer time), and for
a missing time the offset in force before the change (so 02:30 reads as 01:30 UTC, the
instant the clocks showed 03:30). A ``createdAt`` that cannot be read, or is before
2000 or more than a day ahead, leaves ``listed_at`` null with a warning; the number is
kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Annotated, Any, Final, NamedTuple

import pydantic
import structlog

from daemon.responses import (
    MAX_ITEM_WARNINGS,
    MAX_PHONE_CHARS,
    Envelope,
    phone_problem,
)
from daemon.responses import _lenient_int as lenient_int  # the same drift as `total`
from daemon.status import AUTH_RETRY, plausible_report_date

_log = structlog.get_logger(__name__)

#: Outcomes of one sync, as ``stop_list_syncs.outcome`` stores them.
OK, TRUNCATED = "ok", "truncated"
#: The largest ``provider_id`` a BIGINT holds; a larger ``id`` is stored as null.
_MAX_ID: Final = 2**63 - 1
_PHONE_INT_LIMIT: Final = 10**MAX_PHONE_CHARS


class StopListEnvelope(Envelope):
    """The list's answer: the envelope of every endpoint (``success``, ``code``,
    ``message``, read as leniently) with the list's own ``nbData`` and ``data``."""

    nb_data: Annotated[int | None, pydantic.BeforeValidator(lenient_int)] = pydantic.Field(
        default=None, alias="nbData"
    )
    data: list[Any] | None = None


class ListedNumber(NamedTuple):
    """One number of the account's STOP list as the provider listed it."""

    phone_number: str
    #: The list's ``id``, when it reads as an integer.
    provider_id: int | None
    #: ``createdAt`` as UTC, or None when it could not be read.
    listed_at: datetime | None


def parse_created_at(raw: object, zone: tzinfo) -> datetime | None:
    """``createdAt`` (``2015-07-20 10:19:45``, local time in ``zone``) as aware UTC.

    An ambiguous or missing local time is read with ``fold=0`` (see the module's
    docstring). A text that carries its own offset is read with it. Anything else that
    is not an ISO-8601 date and time gives None.
    """
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    if len(text) < 10:  # "2015-07-20" at least; fromisoformat is lenient past that
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone, fold=0)
    try:
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):  # year 1 or 9999 shifted out of range
        return None


@dataclass
class StopListPages:
    """The list read so far, page by page, and the rule that says when to stop.

    Args:
        zone: the provider's time zone, for ``createdAt``.
        max_pages: the hard cap on pages (``SMSPARTNER_MAX_PAGES``).
        now: the moment of the sync (a ``createdAt`` more than a day after it is wrong).
    """

    zone: tzinfo
    max_pages: int
    now: datetime
    numbers: dict[str, ListedNumber] = field(default_factory=dict)
    pages: int = 0
    #: Raw items received, malformed ones included (what ``nbData`` counts).
    items: int = 0
    skipped: int = 0
    nb_data: int | None = None
    #: False once more items arrived than ``nbData`` says the list holds: a count that
    #: is wrong cannot end the list (the pages do), as ``total`` cannot end a tag.
    nb_data_trusted: bool = True
    #: Why paging stopped (None while it goes on), and whether the answer is whole.
    stop_reason: str | None = None
    complete: bool = False
    _warnings_left: int = MAX_ITEM_WARNINGS

    def add_page(self, envelope: StopListEnvelope) -> bool:
        """Take in the next page; return True when another page should be asked for."""
        self.pages += 1
        if self.pages == 1:
            self.nb_data = envelope.nb_data
        elif envelope.nb_data != self.nb_data:
            return self._stop("list_changed", complete=False)
        raw = envelope.data
        if raw is None:
            return self._stop("unreadable_page", complete=False)
        if not raw:
            return self._stop("empty_page", complete=self._all_arrived(self.items))
        before, skipped_before = len(self.numbers), self.skipped
        self.items += len(raw)
        for index, item in enumerate(raw):
            self._add_item(item, index)
        if self.skipped - skipped_before == len(raw):
            return self._stop("unreadable_page", complete=False)
        if len(self.numbers) == before:
            # A page of repeats: a server ignoring ``page``; it does not count as items.
            return self._stop("no_new_numbers", complete=self._all_arrived(self.items - len(raw)))
        if self.nb_data is not None and self.items > self.nb_data:
            self.nb_data_trusted = False
        if self._counted and self.nb_data is not None and self.items >= self.nb_data:
            return self._stop("all_listed", complete=True)
        if self.pages >= self.max_pages:
            return self._stop("max_pages", complete=False)
        return True

    @property
    def _counted(self) -> bool:
        """Whether ``nbData`` is there and believable."""
        return self.nb_data is not None and self.nb_data_trusted

    def _all_arrived(self, items: int) -> bool:
        return not self._counted or items >= (self.nb_data or 0)

    def _stop(self, reason: str, *, complete: bool) -> bool:
        self.stop_reason, self.complete = reason, complete
        return False

    @property
    def why_incomplete(self) -> str:
        """One line for ``stop_list_syncs.error`` when the answer is not whole."""
        got = f"{self.items} item(s) of nbData {self.nb_data}" if self.nb_data is not None else ""
        reasons = {
            "max_pages": f"still going after SMSPARTNER_MAX_PAGES={self.max_pages} pages",
            "empty_page": "the pages ended early",
            "no_new_numbers": "a page repeated numbers already seen before the list ended",
            "list_changed": "nbData changed between pages (the list changed while paging)",
            "unreadable_page": "a page held no readable number (or no data)",
        }
        reason = reasons.get(self.stop_reason or "", self.stop_reason or "unknown")
        details = ", ".join(x for x in (f"page {self.pages}", got) if x)
        return f"incomplete answer: {reason} ({details}); nothing was changed"

    # --- items ------------------------------------------------------------------------

    def _add_item(self, item: object, index: int) -> None:
        if type(item) is not dict:
            self._skip(index, "item", f"not an object ({type(item).__name__})")
            return
        phone = item.get("phoneNumber")
        if type(phone) is int and -_PHONE_INT_LIMIT < phone < _PHONE_INT_LIMIT:
            phone = str(phone)
        if type(phone) is not str:
            self._skip(index, "phoneNumber", "missing" if phone is None else "not a string")
            return
        phone = phone.strip()
        if (problem := phone_problem(phone)) is not None:
            self._skip(index, "phoneNumber", problem)
            return
        raw_id = item.get("id")
        provider_id = lenient_int(raw_id)
        if provider_id is not None and not -_MAX_ID <= provider_id <= _MAX_ID:
            provider_id = None
        if provider_id is None and raw_id is not None:
            self._warn("stop_list.item_coerced", index=index, field="id", outcome="kept without")
        raw_created = item.get("createdAt")
        listed_at = parse_created_at(raw_created, self.zone)
        if listed_at is not None and not plausible_report_date(listed_at, self.now):
            listed_at = None
        if listed_at is None and raw_created not in (None, ""):
            self._warn(
                "stop_list.item_coerced", index=index, field="createdAt", outcome="kept without"
            )
        known = self.numbers.get(phone)
        if known is None:
            self.numbers[phone] = ListedNumber(phone, provider_id, listed_at)
        elif known.listed_at is None and listed_at is not None:  # listed twice: keep a date
            self.numbers[phone] = known._replace(listed_at=listed_at)

    def _skip(self, index: int, field_name: str, reason: str) -> None:
        self.skipped += 1
        self._warn("stop_list.item_skipped", index=index, field=field_name, reason=reason)

    def _warn(self, event: str, **fields: object) -> None:
        """Warn about one item, at most :data:`MAX_ITEM_WARNINGS` times per sync."""
        if self._warnings_left <= 0:
            return
        self._warnings_left -= 1
        if self._warnings_left == 0:
            fields["note"] = "further item warnings for this sync are suppressed"
        _log.warning(event, page=self.pages, **fields)


def sync_due(
    last_started_at: datetime | None,
    last_outcome: str | None,
    *,
    now: datetime,
    interval: timedelta,
) -> bool:
    """Whether the daemon should sync the list now, given the last attempt (any replica's).

    Every ``interval`` (0 means never), counted from the start of the last attempt
    whatever its outcome: a failing sync is retried at the next interval, not at once.
    After a rejected key (``auth_error``) the next attempt comes after
    :data:`~daemon.status.AUTH_RETRY` if that is sooner, as polling probes the key.
    A last attempt dated more than an interval ahead (a replica's clock far off) does
    not stop syncing.
    """
    if interval <= timedelta(0):
        return False
    if last_started_at is None:
        return True
    wait = min(interval, AUTH_RETRY) if last_outcome == "auth_error" else interval
    age = now - last_started_at
    return age >= wait or age < -wait
