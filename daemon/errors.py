"""The project's one exception tree.

Every error the daemon raises on purpose derives from :class:`SmsPartnerStatusError`
and says whether retrying could help (``transient``). Third-party errors (httpx,
SQLAlchemy, pydantic) are translated at the edge that meets them, with ``raise … from``,
so callers only ever catch ours::

    SmsPartnerStatusError                 (transient: False unless noted)
    ├── ConfigError                       a setting is missing or invalid
    ├── InputError                        a CLI argument or HTTP body is invalid
    ├── PollAbandoned                     stopping: this poll cannot end by the deadline
    ├── ApiError                          the SMS Partner boundary
    │   ├── AuthError                     codes 1/10: key missing or wrong
    │   ├── NoMessagesError               code 4: nothing under this tag (yet)
    │   ├── PermanentApiError             other 4xx, other provider codes
    │   └── TransientApiError  (True)     transport, 5xx, bad body, timeouts
    │       ├── RateLimitedError (True)   HTTP 429 / code 429, maybe with Retry-After
    │       └── DeadlineExceededError (True)  no whole answer within the request deadline
    └── StoreError                        the database boundary
        ├── SchemaOutOfDateError          auto-migrate off and schema behind head
        ├── DatabaseBusyError             another `run` holds this SQLite file
        └── DatabaseUnavailableError (True)  connection lost, locked, disk full

Messages never contain the API key: the client redacts URLs before building them.
"""

from __future__ import annotations


class SmsPartnerStatusError(Exception):
    """Root of every error this project raises on purpose."""

    transient: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(SmsPartnerStatusError):
    """A setting is missing or invalid; the message names the variable."""


class InputError(SmsPartnerStatusError):
    """A CLI argument or HTTP body is invalid; the message names the field."""


class PollAbandoned(SmsPartnerStatusError):
    """The daemon is stopping and this poll cannot finish before its shutdown deadline.

    Not a failure of the provider nor of the database, so not an :class:`ApiError`: the
    poller lets it through without writing anything (no ``poll_runs`` row, the tag's
    counters and schedule untouched), and the tag, still due, is polled at the next start.

    Attributes:
        pages: pages fetched before the poll was abandoned.
    """

    def __init__(self, message: str, *, pages: int = 0) -> None:
        super().__init__(message)
        self.pages = pages


class ApiError(SmsPartnerStatusError):
    """Anything that went wrong talking to SMS Partner.

    Attributes:
        code: the provider's JSON ``code`` when it sent one.
        http_status: the HTTP status when a response arrived.
    """

    def __init__(
        self, message: str, *, code: int | None = None, http_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class AuthError(ApiError):
    """The provider rejected the API key (code 1: missing, code 10: incorrect)."""


class NoMessagesError(ApiError):
    """Code 4: no message under this tag. Early in a tag's life this is normal."""


class PermanentApiError(ApiError):
    """A request the provider will refuse again if repeated unchanged."""


class TransientApiError(ApiError):
    """A failure that may pass: transport errors, 5xx, unreadable bodies."""

    transient = True


class RateLimitedError(TransientApiError):
    """HTTP 429 or JSON code 429.

    Attributes:
        retry_after: seconds the provider asked us to wait, when it said so.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        code: int | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.retry_after = retry_after


class DeadlineExceededError(TransientApiError):
    """No complete answer within the whole-request deadline.

    Transient for the tag, which is polled again on its backoff, but not retried within
    the same poll: a provider that trickles or stalls is likely to do it again at once,
    and each retry would hold a worker (and so the healthy tags) for another deadline.
    """


class StoreError(SmsPartnerStatusError):
    """Anything that went wrong with the database."""


class SchemaOutOfDateError(StoreError):
    """The schema is behind the code and auto-migration is off."""


class DatabaseBusyError(StoreError):
    """Another daemon already owns this SQLite file."""


class DatabaseUnavailableError(StoreError):
    """The database cannot be reached or written right now."""

    transient = True


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception; for a database error, the driver's own (the
    SQLAlchemy wrapper's text repeats the statement and its parameters)."""
    orig = getattr(exc, "orig", None)  # sqlalchemy.exc.DBAPIError, without importing it
    if isinstance(orig, BaseException):
        exc = orig
    return f"{type(exc).__name__}: {exc}"
