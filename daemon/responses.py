"""Reading SMS Partner's answers tolerantly: the page envelope and its items.

The provider's field types drift (``stopSMS`` as bool or "0"/"1", ``date`` as text or
number, statuses in any case) and it documents none of its edge cases, so nothing here
raises on a bad field: a garbled envelope field only disables the rule that uses it, and
a malformed item is skipped and counted, never the page. "Malformed" includes what the
database could not hold or a terminal should not print: a phone number that is not 1–32
printable characters without spaces, a status with NUL or a lone surrogate.
:mod:`daemon.smspartner`, the only user, owns the HTTP around it.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Final

import pydantic
import structlog

from daemon.status import Report, Status, map_provider_status, parse_provider_date

_log = structlog.get_logger(__name__)

#: Per-fetch cap on per-item warnings, so a provider-wide format change logs a sample
#: and a count rather than 100,000 lines.
MAX_ITEM_WARNINGS: Final = 20
#: The ``code`` of a successful answer.
OK_CODE: Final = 200

#: The longest phone number accepted. E.164 numbers have at most 15 digits; this leaves
#: room for formatting and fits ``delivery_statuses.phone_number`` (64) with margin.
MAX_PHONE_CHARS: Final = 32

_PHONE_INT_LIMIT: Final = 10**MAX_PHONE_CHARS
#: A status text's verdict: ``(status, the text)``, or ``(why it is refused, None)``.
_StatusEntry = tuple[Status, str] | tuple[str, None]

_TRUE_TEXT: Final = frozenset({"1", "true"})
_FALSE_TEXT: Final = frozenset({"0", "false", ""})


def _lenient_int(value: object) -> int | None:
    """An int from an int or numeric string; None for anything else (never raises).

    The provider's field types drift, and a garbled ``total`` must only disable the rule
    that uses it, not fail the page.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if number.is_integer() else None
    return None


def _lenient_bool(value: object) -> bool | None:
    """A bool from ``true``/``false``, ``0``/``1`` (int or text); None when unrecognised."""
    if value is True or value is False:
        return value
    if isinstance(value, int):
        return {0: False, 1: True}.get(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE_TEXT:
            return True
        if text in _FALSE_TEXT:
            return False
    return None


def _lenient_text(value: object) -> str | None:
    """The provider's ``message`` as text whatever JSON type it arrived as (never raises:
    a message nested a thousand levels deep is shown by its type)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def _excerpt(value: object) -> str:
    """A short, one-line sketch of a provider value for a warning; never raises, and
    never walks a deeply nested value (:mod:`reprlib` stops after a few levels)."""
    return reprlib.repr(value)[:40]


def phone_problem(phone: str) -> str | None:
    """Why ``phone`` (stripped) cannot be a stored phone number, or None when it can.

    A number is 1 to :data:`MAX_PHONE_CHARS` printable characters without spaces. That
    keeps out what the database cannot hold (NUL, lone surrogates, text longer than the
    column) and what must never reach a terminal raw (escape sequences, bidi controls);
    the provider's own numbers are digits with an optional ``+``. Nothing stricter is
    asked: a provider's odd but harmless format (``-1``) is still stored as sent.
    """
    if not phone:
        return "empty"
    if len(phone) > MAX_PHONE_CHARS:
        return f"longer than {MAX_PHONE_CHARS} characters ({len(phone)})"
    if not phone.isprintable() or " " in phone:
        return "not printable characters without spaces"
    return None


def text_problem(text: str) -> str | None:
    """Why provider text cannot be stored as it is, or None when it can: PostgreSQL
    refuses NUL in text, and neither database driver can encode a lone surrogate."""
    if "\x00" in text:
        return "contains NUL"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid Unicode (lone surrogate)"
    return None


class Envelope(pydantic.BaseModel):
    """The page envelope. Items stay raw here; :class:`ItemParser` handles them.

    Validating 1,000 items through a pydantic model per page costs several times more
    than the hand-written checks in :class:`ItemParser`, and per-item tolerance (skip one,
    keep the page) is easier to express there.
    """

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    success: Annotated[bool | None, pydantic.BeforeValidator(_lenient_bool)] = None
    code: Annotated[int | None, pydantic.BeforeValidator(_lenient_int)] = None
    message: Annotated[str | None, pydantic.BeforeValidator(_lenient_text)] = None
    current_page: Annotated[int | None, pydantic.BeforeValidator(_lenient_int)] = pydantic.Field(
        default=None, alias="currentPage"
    )
    total: Annotated[int | None, pydantic.BeforeValidator(_lenient_int)] = None
    items: list[Any] | None = pydantic.Field(default=None, alias="StatutResponse_List")

    @property
    def is_error(self) -> bool:
        """The provider signals errors with ``success: false`` or a non-200 ``code``."""
        return self.success is False or (self.code is not None and self.code != OK_CODE)


# --- item parsing -------------------------------------------------------------------


def _type_problem(value: object) -> str:
    """Why a required text field was rejected, for the ``api.item_skipped`` warning."""
    return "missing" if value is None else f"not a string ({type(value).__name__})"


class ItemParser:
    """Turns raw items into :class:`Report` objects for one fetch, tolerantly.

    One malformed item is skipped (and counted), never the page. Lookups that repeat
    across items (status text, send-time ``date``) are cached for the fetch: a bulk send
    shares a handful of statuses and dates, and this keeps the per-item cost at roughly
    a microsecond.

    ``known`` maps numbers to the report the store has already applied: an item that
    reads as exactly that report yields none (its number still counts as seen). On a
    re-poll where 1 % changed, that leaves 1 % of the items to merge and diff.
    """

    def __init__(
        self,
        tag: str,
        known: Mapping[str, Report] | None = None,
        *,
        clean: Callable[[str], str] = str,
    ) -> None:
        self.tag = tag
        # Applied to the status text before it is kept: a provider echoing the API key
        # in an item must not put it in ``provider_status`` (and so in reports and logs).
        self._clean = clean
        self.skipped = 0
        #: Every number with a well-formed item, including those ``known`` left out.
        self.seen: set[str] = set()
        self._known: Mapping[str, Report] = known or {}
        self._warnings_left = MAX_ITEM_WARNINGS
        # Status text → (status, one shared copy of the text), so the reports a poller
        # keeps (daemon/answers.py) do not hold 100,000 copies of "Delivered".
        # A text that cannot be stored maps to (why, None).
        self._status_cache: dict[str, _StatusEntry] = {}
        self._date_cache: dict[str, datetime | None] = {}

    def parse_page(self, raw_items: list[Any], page: int) -> list[Report]:
        """Parse one page's items, in order; skipped items are logged and counted."""
        reports: list[Report] = []
        append = reports.append
        status_cache = self._status_cache
        date_cache = self._date_cache
        seen_add = self.seen.add
        known_get = self._known.get if self._known else None  # a first poll knows nothing
        # tuple.__new__ skips the NamedTuple's Python-level __new__: a quarter of the
        # parsing time at 100,000 items.
        new, report_type = tuple.__new__, Report
        for index, item in enumerate(raw_items):
            if type(item) is not dict:
                self._skip(page, index, "item", f"not an object ({type(item).__name__})")
                continue
            phone = item.get("phoneNumber")
            if type(phone) is str:
                phone = phone.strip()
            elif type(phone) is int:
                if not -_PHONE_INT_LIMIT < phone < _PHONE_INT_LIMIT:  # str() fails past 4,300
                    self._skip(page, index, "phoneNumber", f"over {MAX_PHONE_CHARS} digits")
                    continue
                phone = str(phone)
            else:
                self._skip(page, index, "phoneNumber", _type_problem(phone))
                continue
            if (problem := phone_problem(phone)) is not None:
                self._skip(page, index, "phoneNumber", problem)
                continue
            raw_status = item.get("status")
            if type(raw_status) is not str:
                self._skip(page, index, "status", _type_problem(raw_status))
                continue
            # Checked once per distinct text: a bulk send shares a handful of statuses.
            status = status_cache.get(raw_status)
            if status is None:
                status = status_cache[raw_status] = self._status_of(raw_status)
            if status[1] is None:
                self._skip(page, index, "status", str(status[0]))
                continue
            seen_add(phone)
            stop_sms = item.get("stopSMS")
            if stop_sms is not True and stop_sms is not False:
                stop_sms = self._coerce_stop_sms(stop_sms, page, index)
            raw_date = item.get("date")
            if type(raw_date) is str:
                try:
                    reported_at = date_cache[raw_date]
                except KeyError:
                    reported_at = date_cache[raw_date] = parse_provider_date(raw_date)
                if reported_at is None and raw_date.strip():
                    self._coerced(page, index, "date", raw_date, "kept without a date")
            else:
                reported_at = parse_provider_date(raw_date)
                if reported_at is None and raw_date is not None:
                    self._coerced(page, index, "date", raw_date, "kept without a date")
            if (
                known_get is not None
                and (old := known_get(phone)) is not None
                and old.reported_at == reported_at
                and old.stop_sms is stop_sms
                and old.provider_status == status[1]
            ):
                continue  # the report the store already holds
            append(new(report_type, (phone, status[0], status[1], stop_sms, reported_at)))
        return reports

    def _status_of(self, raw: str) -> _StatusEntry:
        """``(status, text to keep)`` for a storable status text, ``(why, None)`` otherwise."""
        problem = text_problem(raw)
        if problem is not None:
            return problem, None
        return map_provider_status(raw), self._clean(raw)

    def _coerce_stop_sms(self, raw: object, page: int, index: int) -> bool:
        """``stopSMS`` drifts between bool and "0"/"1"; anything else means False."""
        if raw is None:
            return False
        value = _lenient_bool(raw)
        if value is None:
            self._coerced(page, index, "stopSMS", raw, "treated as false")
            return False
        return value

    def _skip(self, page: int, index: int, field: str, reason: str) -> None:
        self.skipped += 1
        self._warn("api.item_skipped", page=page, index=index, field=field, reason=reason)

    def _coerced(self, page: int, index: int, field: str, raw: object, outcome: str) -> None:
        self._warn(
            "api.item_coerced",
            page=page,
            index=index,
            field=field,
            value=_excerpt(raw),
            outcome=outcome,
        )

    def _warn(self, event: str, **fields: object) -> None:
        if self._warnings_left <= 0:
            return
        self._warnings_left -= 1
        if self._warnings_left == 0:
            fields["note"] = "further item warnings for this fetch are suppressed"
        _log.warning(event, tag=self.tag, **fields)


def envelope_or_none(body: dict[str, Any] | None) -> Envelope | None:
    """An error response's body as an envelope, or None when unusable (never raises)."""
    if body is None:
        return None
    try:
        return Envelope.model_validate(body)
    except pydantic.ValidationError:
        return None
