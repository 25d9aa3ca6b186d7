"""Configuration: one typed object, built once in ``main()`` and passed down.

Every value comes from ``SMSPARTNER_*`` environment variables or a ``.env`` file in the
working directory. Secrets (the API key, the HTTP token, the database URL, which may
hold a password) may also come from a file named by ``SMSPARTNER_<NAME>_FILE`` or from
systemd's ``$CREDENTIALS_DIRECTORY/<name>`` (``LoadCredential=api_key:…``). The
environment beats ``.env``, and in each a variable beats its ``_FILE`` (the order, and
the reading, live in :mod:`daemon.sources`). A bad value fails fast with one line naming
the variable.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from daemon.errors import ConfigError
from daemon.sources import DEFAULT_DATABASE_URL, DOTENV, ENV_PREFIX, SECRET_FIELDS, secret_values

__all__ = ["ENV_PREFIX", "SECRET_FIELDS", "Settings", "load_settings"]
if TYPE_CHECKING:
    import zoneinfo
from daemon.status import MAX_REPORT_WINDOW, CadenceStep, parse_cadence

#: The slowest client-side rate limit: one request every 1,000 s.
MIN_RATE_LIMIT = 0.001
#: The shortest API key accepted.
MIN_API_KEY_LENGTH = 8
#: ``drivername`` → (module that must be importable, how to get it). Only synchronous
#: drivers the store was written for: :mod:`daemon.sql` talks to pysqlite and psycopg
#: directly, and the whole daemon is one synchronous stack.
SUPPORTED_DRIVERS = {
    "sqlite": ("_sqlite3", "a Python built with its sqlite3 module"),
    "sqlite+pysqlite": ("_sqlite3", "a Python built with its sqlite3 module"),
    "postgresql": ("psycopg", "pip install 'smspartner-status[postgres]'"),
    "postgresql+psycopg": ("psycopg", "pip install 'smspartner-status[postgres]'"),
}
_ASYNC_DRIVERS = ("asyncpg", "psycopg_async", "aiosqlite", "pysqlite_async", "aiopg")


def driver_problem(drivername: str) -> str | None:
    """Why a database URL's driver cannot work here, or None when it can.

    Checked when the settings are built, cheaply (``find_spec`` imports nothing), so a
    missing driver is one line naming what to install, not a ``ModuleNotFoundError``
    from the first command that opens the database.
    """
    if drivername not in SUPPORTED_DRIVERS:
        driver = drivername.partition("+")[2]
        why = ": an async driver cannot work in this synchronous daemon" * (
            driver in _ASYNC_DRIVERS
        )
        return (
            f"driver {driver!r} is not supported{why}; use sqlite:///path/to/file.db, or "
            "postgresql://… with psycopg (pip install 'smspartner-status[postgres]')"
        )
    module, remedy = SUPPORTED_DRIVERS[drivername]
    if importlib.util.find_spec(module) is None:
        return f"the driver for {drivername}:// is not installed ({module}); needs {remedy}"
    return None


class Settings(BaseSettings):
    """Everything the daemon can be told; names are public API (see README)."""

    # allow_inf_nan=False: "inf" or "nan" is never a sensible number of seconds or hours.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=DOTENV, extra="ignore", frozen=True, allow_inf_nan=False
    )

    api_key: SecretStr | None = None
    base_url: str = "https://api.smspartner.fr/v1"
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    report_window_hours: float = Field(48.0, gt=0)
    # Upper bounds far beyond any sensible value, so that no value crashes deep inside
    # (timedelta and socket timeouts overflow): an hour per request, a year to settle.
    http_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    max_retries: int = Field(3, ge=0, le=20)
    retry_backoff_seconds: float = Field(1.0, ge=0)
    rate_limit_per_second: float = Field(5.0, ge=0)
    concurrency: int = Field(4, ge=1, le=64)
    poll_cadence: str = "15m=1m,2h=5m,12h=15m,48h=1h"
    settle_minutes: float = Field(10.0, ge=0, le=MAX_REPORT_WINDOW / timedelta(minutes=1))
    max_pages: int = Field(1000, ge=1)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8787, ge=0, le=65535)
    http_token: SecretStr | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    auto_migrate: bool = True
    # Retention of `run`'s daily job (unset = keep forever); `prune` does the rest.
    prune_events_days: float | None = Field(None, gt=0, le=36500)  # a century
    prune_runs_days: float | None = Field(None, gt=0, le=36500)
    # The account's STOP list (GET /stop-sms/list): synced by `run` at start, then this
    # often (0 = never); its createdAt is the provider's local time, in this zone.
    stop_list_interval_minutes: float = Field(60.0, ge=0, le=525600)  # a year
    provider_timezone: str = "Europe/Paris"

    @field_validator("api_key", "http_token", "prune_events_days", "prune_runs_days", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `SMSPARTNER_API_KEY=` as copied from .env.example means "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("report_window_hours")
    @classmethod
    def _check_report_window(cls, value: float) -> float:
        limit = MAX_REPORT_WINDOW / timedelta(hours=1)
        if value > limit:
            raise ValueError(
                f"must be at most {limit:g} hours (a year); SMS Partner documents 48 hours"
            )
        return value

    @field_validator("rate_limit_per_second")
    @classmethod
    def _check_rate_limit(cls, value: float) -> float:
        if 0 < value < MIN_RATE_LIMIT:  # a wait of 1/rate seconds must stay sleepable
            raise ValueError(f"must be 0 (no limit) or at least {MIN_RATE_LIMIT:g}")
        return value

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        try:
            url = make_url(value.get_secret_value())
        except ArgumentError:
            raise ValueError("is not a database URL like sqlite:///file.db") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:/// and postgresql:// URLs are supported")
        if problem := driver_problem(url.drivername):
            raise ValueError(problem)
        return value

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A key of a few characters is a copy-paste slip, and would be "redacted" out of
        # every word it occurs in, garbling the logs. Never quote the value.
        if value is not None and len(value.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"must be at least {MIN_API_KEY_LENGTH} characters (got "
                f"{len(value.get_secret_value())}); is it the whole key?"
            )
        return value

    @field_validator("poll_cadence")
    @classmethod
    def _check_cadence(cls, value: str) -> str:
        # Bounded like the window itself, so that ``now + interval`` never overflows.
        if any(max(s.until, s.every) > MAX_REPORT_WINDOW for s in parse_cadence(value)):
            raise ValueError(
                f"ages and intervals must be at most {MAX_REPORT_WINDOW.days} days (a year)"
            )
        return value

    @field_validator("provider_timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        import zoneinfo  # only this setting needs it

        name = value.strip()
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe"
            raise ValueError(
                f"{name[:60]!r} is not a time zone name like Europe/Paris (IANA tz database)"
            ) from None
        return name

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def cadence(self) -> tuple[CadenceStep, ...]:
        """The parsed poll cadence."""
        return parse_cadence(self.poll_cadence)

    @property
    def report_window(self) -> timedelta:
        """How long after sending a delivery report can still arrive."""
        return timedelta(hours=self.report_window_hours)

    @property
    def settle(self) -> timedelta:
        """How long after sending a fully resolved tag may be marked completed."""
        return timedelta(minutes=self.settle_minutes)

    @property
    def provider_zone(self) -> zoneinfo.ZoneInfo:
        """The provider's time zone (validated when the settings were built)."""
        import zoneinfo

        return zoneinfo.ZoneInfo(self.provider_timezone)

    @property
    def stop_list_interval(self) -> timedelta:
        """How often ``run`` syncs the account's STOP list (zero: never)."""
        return timedelta(minutes=self.stop_list_interval_minutes)

    @property
    def safe_database_url(self) -> str:
        """The database URL with its password masked, for messages and logs."""
        return make_url(self.database_url.get_secret_value()).render_as_string(hide_password=True)

    def secrets(self) -> list[str]:
        """Every secret value, for the log redaction processor."""
        found = [s.get_secret_value() for s in (self.api_key, self.http_token) if s]
        password = make_url(self.database_url.get_secret_value()).password
        if password:
            found.append(str(password))
        return [s for s in found if s]


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build the settings, or raise :class:`ConfigError` naming the bad variable.

    Args:
        environ: the environment to read secrets' ``*_FILE`` paths from (default
            ``os.environ``; the variables themselves are read by pydantic-settings).
        overrides: values that win over the environment (CLI options, tests).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {**secret_values(environ)}
    values.update(overrides)
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}: {message}") from None
