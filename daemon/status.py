"""The pure core: what a provider status means, which report wins, when a tag is due,
and what a poll's outcome does to its tag (:func:`decide`).

Nothing here does I/O or reads a clock: every function that depends on time takes
``now``. The store's upsert statement encodes the same forward-only rule as
:func:`supersedes` (in SQL, so it also holds across processes); the two are kept side
by side in tests.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple


class TagState(enum.StrEnum):
    """A tag's place in its lifecycle, as stored in ``tracked_tags.state``."""

    ACTIVE = "active"
    COMPLETED = "completed"
    EXPIRED = "expired"
    UNTRACKED = "untracked"


class PollOutcome(enum.StrEnum):
    """How one poll of a tag ended, as stored in ``poll_runs.outcome``."""

    OK = "ok"
    API_ERROR = "api_error"
    TRANSIENT_ERROR = "transient_error"
    AUTH_ERROR = "auth_error"


class Status(enum.StrEnum):
    """A number's delivery status as stored in ``delivery_statuses.status``."""

    DELIVERED = "delivered"
    NOT_DELIVERED = "not_delivered"
    FAILED = "failed"
    WAITING = "waiting"
    UNKNOWN = "unknown"
    EXPIRED = "expired"


#: Final statuses reported by the provider.
PROVIDER_FINAL = frozenset({Status.DELIVERED, Status.NOT_DELIVERED, Status.FAILED})
#: Every status that ends a number's life (``expired`` is our own verdict).
FINAL = PROVIDER_FINAL | {Status.EXPIRED}
#: Statuses that keep a number on the re-check list.
PENDING = frozenset({Status.WAITING, Status.UNKNOWN})

_PROVIDER_STATUSES = {
    "delivered": Status.DELIVERED,
    "not delivered": Status.NOT_DELIVERED,
    "ko": Status.FAILED,
    "waiting": Status.WAITING,
}


def map_provider_status(raw: str) -> Status:
    """Map the provider's status text, compared trimmed and case-insensitively.

    Anything not documented becomes ``unknown``; the caller keeps the raw text.
    """
    return _PROVIDER_STATUSES.get(" ".join(raw.split()).lower(), Status.UNKNOWN)


class Report(NamedTuple):
    """One number's status as one response reported it.

    A NamedTuple, not a dataclass: a 100,000-number poll builds 100,000 of them, and
    tuple construction and comparison are several times cheaper.
    """

    phone_number: str
    status: Status
    provider_status: str
    stop_sms: bool
    reported_at: datetime | None


def supersedes(new: Report, old: Report) -> bool:
    """Whether ``new`` changes what is stored for ``old`` (same number).

    True when its status should replace the stored one (:func:`status_advances`) or when
    it turns ``stop_sms`` on (it never turns off).
    """
    if new.stop_sms and not old.stop_sms:
        return True
    return status_advances(new, old)


def _later(new: Report, old: Report) -> bool:
    """A dated report is later than an undated one; equal dates are not later."""
    return new.reported_at is not None and (
        old.reported_at is None or new.reported_at > old.reported_at
    )


def status_advances(new: Report, old: Report) -> bool:
    """Whether ``new``'s status (and date) should replace ``old``'s.

    The forward-only rule of design.md, made independent of arrival order:

    * a provider-final status beats any pending status and our own ``expired``;
    * between two provider-final reports the strictly later date wins (an undated one
      never replaces a final one; equal dates keep what is stored);
    * between two pending reports the strictly later date wins, and at an equal date
      ``unknown`` beats ``waiting`` (the provider said something more specific);
    * nothing replaces a final status with a pending one.

    The store's upsert encodes the same rule in SQL; a test checks they agree.
    """
    if new.status in PROVIDER_FINAL:
        if old.status in PENDING or old.status is Status.EXPIRED:
            return True
        return _later(new, old)
    if new.status not in PENDING or old.status not in PENDING:
        return False
    if _later(new, old):
        return True
    return (
        new.reported_at == old.reported_at
        and new.status is Status.UNKNOWN
        and old.status is Status.WAITING
    )


#: At an equal date, which of two reports of the same kind (both provider-final, or both
#: pending) one answer keeps: the higher rank. :func:`status_advances` leaves these ties
#: to "keep what is stored", which inside one answer would mean "the first item wins";
#: the provider sends no order we could trust, so a fixed rule decides instead. A
#: delivery receipt beats a failure report (the handset confirmed it), and the
#: operator's "not delivered" beats the platform's "ko" (it says more).
_TIE_RANK = {
    Status.DELIVERED: 3,
    Status.NOT_DELIVERED: 2,
    Status.FAILED: 1,
    Status.UNKNOWN: 1,
    Status.WAITING: 0,
    Status.EXPIRED: 0,
}


def _wins_tie(new: Report, old: Report) -> bool:
    """Between two reports neither of which advances the other: the higher status rank,
    then the greater raw text (``Delivered`` vs ``delivered``), so nothing depends on
    which came first."""
    return (_TIE_RANK[new.status], new.provider_status) > (
        _TIE_RANK[old.status],
        old.provider_status,
    )


def merge(new: Report, old: Report) -> Report:
    """The report to keep when one answer holds the same number twice.

    :func:`status_advances` decides; when neither report advances the other (an equal
    date, or two final reports without a date), :func:`_wins_tie` does. The result
    does not depend on the order of the two (nor, folded, of any number of them):
    ``stop_sms`` is on when either has it.
    """
    if status_advances(new, old):
        base = new
    elif status_advances(old, new):
        base = old
    else:
        base = new if _wins_tie(new, old) else old
    return Report(
        phone_number=old.phone_number,
        status=base.status,
        provider_status=base.provider_status,
        stop_sms=old.stop_sms or new.stop_sms,
        reported_at=base.reported_at,
    )


def merge_reports(reports: Sequence[Report]) -> dict[str, Report]:
    """Collapse reports to one per number, each with its most advanced status, whatever
    their order (see :func:`merge`)."""
    merged = {report.phone_number: report for report in reports}
    if len(merged) == len(reports):
        return merged  # no number twice, the usual case: nothing to decide
    merged = {}
    for report in reports:
        seen = merged.get(report.phone_number)
        merged[report.phone_number] = report if seen is None else merge(report, seen)
    return merged


#: Provider dates before this are not delivery reports of ours (a zero, a typo).
EARLIEST_REPORT_DATE = datetime(2000, 1, 1, tzinfo=UTC)
#: How far ahead of our clock a provider date may be (clock skew, time zones) before it
#: is treated as unknown: a date in the year 5138 would otherwise win every comparison
#: with the correctly dated reports that follow it.
MAX_REPORT_AHEAD = timedelta(days=1)


def plausible_report_date(reported_at: datetime, now: datetime) -> bool:
    """Whether a parsed provider date can be a real report's: from 2000 to a day ahead."""
    return EARLIEST_REPORT_DATE <= reported_at <= now + MAX_REPORT_AHEAD


def parse_provider_date(raw: object) -> datetime | None:
    """Parse the provider's ``date`` (Unix seconds, usually as a string).

    Returns None for anything that is not a plausible timestamp (empty, garbage,
    negative, beyond year 9999), so one bad date never loses a status.
    """
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        seconds = float(raw.strip()) if isinstance(raw, str) else float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a 400-digit integer
        return None
    if not 0 < seconds < 253_402_300_800:  # 9999-12-31
        return None
    return datetime.fromtimestamp(int(seconds), tz=UTC)


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 date-time given by a user; without an offset it is UTC.

    Raises:
        ValueError: not an ISO-8601 date-time, or not one of the calendar once in UTC
            (``0001-01-01T00:00:00+01:00``); the message quotes the text.
    """
    shown = _quoted(text)
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{shown} is not an ISO-8601 date-time like 2026-11-26T09:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{shown} is outside the years 1 to 9999 in UTC") from None


#: The longest report window ``SMSPARTNER_REPORT_WINDOW_HOURS`` may ask for. SMS Partner
#: documents 48 hours; a year is plenty, and keeps every window inside the calendar.
MAX_REPORT_WINDOW = timedelta(days=365)
#: The latest ``sent_at`` accepted: its window, however long, still ends by the year 9999.
LATEST_SENT_AT = datetime.max.replace(tzinfo=UTC) - MAX_REPORT_WINDOW


def window_end(sent_at: datetime, window: timedelta) -> datetime:
    """When a tag's report window closes: the one place every caller computes it.

    Users' ``sent_at`` is checked by :func:`parse_sent_at`; one past
    :data:`LATEST_SENT_AT` can only come from a row another program wrote into
    ``tracked_tags``, and is clamped so that it cannot overflow the date arithmetic
    (``window`` is at most :data:`MAX_REPORT_WINDOW`, a bound the settings enforce).
    """
    return min(sent_at, LATEST_SENT_AT) + window


def parse_sent_at(text: str) -> datetime:
    """When a campaign was sent, as a user gives it (CLI, HTTP body, tag file).

    The one check behind ``--sent-at``, the ``sent_at`` of ``POST /tags`` and the
    ``sent_at`` column of ``track --from-file``: an ISO-8601 date-time (without an offset
    it is UTC), early enough that adding any allowed report window stays a date-time.

    Raises:
        ValueError: a message that quotes the text and says what is wrong, for the
            caller to prefix with the field's name.
    """
    sent_at = parse_timestamp(text)
    if sent_at > LATEST_SENT_AT:
        raise ValueError(
            f"{_quoted(text)} is too far in the future: its report window would end after "
            "the year 9999"
        )
    return sent_at


def _quoted(text: str, limit: int = 40) -> str:
    """User text for a message: quoted, and cut short if long."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --- tags ---------------------------------------------------------------------------

_TAG_MAX = 64
_PROVIDER_TAG_MAX = 20


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` cannot be tracked, or None when it can (1–64 printable, no spaces)."""
    if not tag:
        return "tag must not be empty"
    if len(tag) > _TAG_MAX:
        return f"tag must be at most {_TAG_MAX} characters (got {len(tag)})"
    if any(ch.isspace() for ch in tag):
        return "tag must not contain whitespace"
    if not tag.isprintable():
        return "tag must contain printable characters only"
    return None


def tag_warnings(tag: str) -> list[str]:
    """Valid but suspicious: the provider documents tags as ≤ 20 chars, lowercase."""
    warnings = []
    if len(tag) > _PROVIDER_TAG_MAX:
        warnings.append(f"SMS Partner documents tags of at most {_PROVIDER_TAG_MAX} characters")
    if tag != tag.lower():
        warnings.append("SMS Partner documents lowercase tags; the tag is kept as given")
    return warnings


# --- cadence and lifecycle ----------------------------------------------------------


#: One step of the poll cadence: tags younger than ``until`` are polled ``every``.
@dataclass(frozen=True, slots=True)
class CadenceStep:
    """Poll every ``every`` while the tag is younger than ``until``."""

    until: timedelta
    every: timedelta


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse ``90s``, ``5m``, ``2h``, ``1d``; raise ValueError with the text otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 2h or 1d")
    try:
        return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    except OverflowError:  # "99999999999d": more days than timedelta holds
        raise ValueError(f"{text!r} is too long a duration") from None


def parse_cadence(spec: str) -> tuple[CadenceStep, ...]:
    """Parse ``15m=1m,2h=5m,12h=15m,48h=1h`` (until age = every), ages increasing."""
    steps: list[CadenceStep] = []
    for part in spec.split(","):
        until, sep, every = part.partition("=")
        if not sep:
            raise ValueError(f"{part.strip()!r} is not AGE=INTERVAL (like 15m=1m)")
        step = CadenceStep(parse_duration(until), parse_duration(every))
        if step.every <= timedelta(0):
            raise ValueError(f"interval in {part.strip()!r} must be positive")
        if steps and step.until <= steps[-1].until:
            raise ValueError("cadence ages must increase from left to right")
        steps.append(step)
    if not steps:
        raise ValueError("cadence must have at least one AGE=INTERVAL step")
    return tuple(steps)


def cadence_interval(age: timedelta, cadence: Sequence[CadenceStep]) -> timedelta:
    """The poll interval for a tag of this age (the last step beyond the last age)."""
    for step in cadence:
        if age < step.until:
            return step.every
    return cadence[-1].every


def next_poll_at(
    *,
    sent_at: datetime,
    window_ends_at: datetime,
    now: datetime,
    cadence: Sequence[CadenceStep],
    consecutive_failures: int = 0,
    retry_base: timedelta = timedelta(seconds=30),
) -> datetime:
    """When a tag polled (or attempted) at ``now`` is due next.

    After failures the wait doubles from ``retry_base`` but never exceeds the tag's
    cadence, so a flaky tag is never polled less often than a healthy one would be.
    The last poll is pinned to the window's end so it always happens.
    """
    interval = cadence_interval(now - sent_at, cadence)
    if consecutive_failures > 0:
        backoff = retry_base * (2 ** min(consecutive_failures - 1, 20))
        interval = min(interval, backoff)
    due = now + interval
    if now < window_ends_at < due:
        return window_ends_at
    return due


def window_closed(window_ends_at: datetime, now: datetime) -> bool:
    """Whether the delivery-report window is over."""
    return now >= window_ends_at


def is_complete(
    *, total: int, pending: int, sent_at: datetime, now: datetime, settle: timedelta
) -> bool:
    """A tag is complete when it has numbers, none unresolved, and has settled.

    ``pending`` counts every number the provider has not resolved: the pending statuses,
    and those the daemon marked ``expired`` when the window closed.
    """
    return total > 0 and pending == 0 and now - sent_at >= settle


#: After the window closes, a failing last poll is retried this long before the tag
#: expires anyway (design.md: "for up to one more hour").
EXPIRY_GRACE = timedelta(hours=1)
#: How long codes 1/10 pause a tag (and, in the daemon, all polling).
AUTH_RETRY = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The settings a lifecycle decision depends on."""

    cadence: Sequence[CadenceStep]
    #: How long after ``sent_at`` a tag with every number final may complete.
    settle: timedelta
    grace: timedelta = EXPIRY_GRACE
    auth_retry: timedelta = AUTH_RETRY


@dataclass(frozen=True, slots=True)
class TagNow:
    """What a decision needs of a tag's row, as the poll's transaction read it."""

    state: TagState
    sent_at: datetime
    window_ends_at: datetime
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class Decision:
    """What one poll's outcome does to its tag; the poller writes it as it is."""

    state: TagState
    #: None when the tag leaves the schedule (completed, expired, untracked).
    next_poll_at: datetime | None
    consecutive_failures: int
    #: The window is over: every still-pending number becomes ``expired`` now.
    expire_pending: bool
    #: Codes 1/10: the key is refused, so polling pauses until :attr:`next_poll_at`.
    auth_paused: bool


def decide(
    tag: TagNow,
    outcome: PollOutcome,
    counts: Mapping[str, int],
    *,
    now: datetime,
    lifecycle: Lifecycle,
) -> Decision:
    """The lifecycle rule of design.md for one poll of ``tag`` that ended in ``outcome``.

    ``counts`` are the tag's numbers per status once the poll's reports are applied (only
    a successful poll can complete a tag, so a failed one may pass what it likes).

    * A successful poll completes the tag when it has numbers, none unresolved (pending,
      or expired by us: a late report may still resolve those) and ``sent_at`` is older
      than the settle period.
    * Once the window has closed, a successful poll (code 4 included) expires the tag and
      its pending numbers; a failing one is retried on its backoff for the grace period,
      after which the tag expires anyway.
    * Otherwise the tag stays active, due again on its cadence; each failure doubles the
      wait (capped by the cadence, and within the grace period after the window), and a
      refused key (codes 1/10) pauses the tag for :attr:`Lifecycle.auth_retry`.
    * An untracked tag stays untracked: what a poll fetched is kept, but only ``track``
      puts the tag back on the schedule.
    """
    ok = outcome is PollOutcome.OK
    failures = 0 if ok else tag.consecutive_failures + 1
    auth = outcome is PollOutcome.AUTH_ERROR
    if tag.state is TagState.UNTRACKED:
        return Decision(TagState.UNTRACKED, None, failures, False, auth)
    ends = tag.window_ends_at
    expire = window_closed(ends, now) and (ok or window_closed(ends + lifecycle.grace, now))
    unresolved = sum(counts.get(s, 0) for s in _UNRESOLVED)
    if ok and is_complete(
        total=sum(counts.values()),
        pending=unresolved,
        sent_at=tag.sent_at,
        now=now,
        settle=lifecycle.settle,
    ):
        # Nothing is pending, so the expiry that may also be due changes no number.
        return Decision(TagState.COMPLETED, None, failures, expire, False)
    if expire:
        return Decision(TagState.EXPIRED, None, failures, True, auth)
    if auth:
        due = now + lifecycle.auth_retry
    else:
        due = next_poll_at(
            sent_at=tag.sent_at,
            window_ends_at=ends,
            now=now,
            cadence=lifecycle.cadence,
            consecutive_failures=failures,
        )
        if not ok and window_closed(ends, now):
            due = min(due, ends + lifecycle.grace)  # the last poll's retries, within grace
    return Decision(TagState.ACTIVE, due, failures, False, auth)


#: What keeps a tag from completing: numbers the provider has not resolved.
_UNRESOLVED = (*PENDING, Status.EXPIRED)
