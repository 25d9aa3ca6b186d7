"""Logging: structlog for our events, the stdlib loggers of httpx, SQLAlchemy and
APScheduler bridged into the same stream, and one redaction processor in front of every
renderer so no secret can reach any output at any level.

httpx logs each request URL with its query string (``apiKey=…``) at INFO/DEBUG; the
redaction processor masks ``apiKey=`` values by pattern, drops the userinfo of every URL
and masks every configured secret in every spelling (:mod:`daemon.redaction`), so even a
log line we did not write cannot leak the key. It rewrites values only: field names and
our own dotted event names (``poll.completed``) are never touched, so no secret can
garble them.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterable, MutableMapping
from datetime import date, datetime, time
from enum import Enum
from typing import Any, TextIO

import structlog

from daemon.redaction import redact_all

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: Our event names (``api.retry_scheduled``): never redacted. A line from another library
#: carries its message in ``event`` instead, and that is redacted like any value.
_EVENT_NAME = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)+")


class Redactor:
    """A structlog processor that masks secrets in every string value of an event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        """Mask ``apiKey=`` query values, URL userinfo and every secret, in every spelling."""
        return redact_all(text, self._secrets)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        if isinstance(value, BaseException):
            return self.redact(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if key == "event" and isinstance(value, str) and _EVENT_NAME.fullmatch(value):
                continue
            event[key] = self._clean(value)
        return event


def configure_logging(
    *,
    level: str = "info",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> Redactor:
    """Set up structlog and the stdlib bridge; returns the redactor for reuse.

    Args:
        level: minimum level name for our events and third-party loggers.
        fmt: ``json``, ``console``, or ``auto`` (console on a TTY, JSON otherwise).
        secrets: values to mask wherever they appear.
        stream: where lines go (the daemon logs to stdout; data-printing CLI verbs log
            to stderr so ``--json`` output stays parseable).
    """
    out = stream or sys.stdout
    redactor = Redactor(secrets)
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            plain_values,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                plain_values,
                redactor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # httpx logs every request at INFO; keep it for debug runs only. APScheduler warns
    # each time a dispatch is skipped because the previous one still runs, which is the
    # intended back-pressure, not a problem.
    for noisy, quiet in (
        ("httpx", logging.WARNING),
        ("httpcore", logging.WARNING),
        ("sqlalchemy", logging.WARNING),
        ("alembic", logging.WARNING),
        ("apscheduler", logging.ERROR),
    ):
        verbose = level == "debug" and noisy != "httpcore"
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else quiet)
    return redactor


def plain_values(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor that turns every value into one JSON can hold as is.

    Both renderers would otherwise print a datetime as its Python repr
    (``datetime.datetime(2026, 12, 3, …)``), which log pipelines cannot parse. Running
    before the redactor also means any object's text is redacted like any string.
    """
    for key, value in event.items():
        event[key] = _plain(value)
    return event


def _plain(value: Any) -> Any:
    """``value`` as str, int, finite float, bool, None, or a list or dict of those:
    datetimes as ISO-8601 (UTC with ``Z``, as the ``timestamp`` of every line), enums as
    their value, exceptions as ``Type: message``, anything else as its ``str()``."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN or inf
    if isinstance(value, datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    try:
        return str(value)
    except Exception:  # a broken __str__ must not cost the log line
        return object.__repr__(value)
