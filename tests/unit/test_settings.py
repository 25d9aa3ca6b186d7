"""Settings: defaults, one clear line naming a bad variable, secrets from files."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.settings import load_settings


def test_defaults_match_the_design() -> None:
    s = load_settings({})
    assert s.base_url == "https://api.smspartner.fr/v1"
    assert s.database_url.get_secret_value() == "sqlite:///smspartner-status.db"
    assert (s.report_window, s.settle) == (timedelta(hours=48), timedelta(minutes=10))
    assert (s.max_retries, s.rate_limit_per_second, s.concurrency, s.max_pages) == (3, 5, 4, 1000)
    assert (s.http_host, s.http_port, s.log_level, s.auto_migrate) == (
        "127.0.0.1",
        8787,
        "info",
        True,
    )
    assert s.cadence[0].every == timedelta(minutes=1)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("SMSPARTNER_CONCURRENCY", "zero", "SMSPARTNER_CONCURRENCY"),
        ("SMSPARTNER_CONCURRENCY", "0", "greater than or equal to 1"),
        ("SMSPARTNER_HTTP_PORT", "70000", "SMSPARTNER_HTTP_PORT"),
        ("SMSPARTNER_POLL_CADENCE", "15m=1m,5m=1m", "must increase"),
        ("SMSPARTNER_BASE_URL", "api.smspartner.fr", "http://"),
        ("SMSPARTNER_DATABASE_URL", "mysql://x/y", "only sqlite"),
        ("SMSPARTNER_LOG_LEVEL", "loud", "SMSPARTNER_LOG_LEVEL"),
        ("SMSPARTNER_AUTO_MIGRATE", "perhaps", "SMSPARTNER_AUTO_MIGRATE"),
        ("SMSPARTNER_REPORT_WINDOW_HOURS", "1e9", "must be at most 8760 hours"),
        ("SMSPARTNER_REPORT_WINDOW_HOURS", "inf", "finite"),
        ("SMSPARTNER_HTTP_TIMEOUT_SECONDS", "nan", "finite"),
        ("SMSPARTNER_POLL_CADENCE", "99999999999d=1m", "too long a duration"),
        ("SMSPARTNER_POLL_CADENCE", "15m=1m,48h=3000000d", "at most 365 days (a year)"),
        ("SMSPARTNER_HTTP_TIMEOUT_SECONDS", "1e10", "less than or equal to 3600"),
        ("SMSPARTNER_RATE_LIMIT_PER_SECOND", "1e-300", "0 (no limit) or at least 0.001"),
        ("SMSPARTNER_SETTLE_MINUTES", "1e13", "less than or equal to 525600"),
        ("SMSPARTNER_PRUNE_EVENTS_DAYS", "1e6", "less than or equal to 36500"),
        ("SMSPARTNER_PRUNE_RUNS_DAYS", "1e12", "less than or equal to 36500"),
    ],
)
def test_bad_value_names_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings({})
    message = str(caught.value)
    assert message.startswith(name + ":") and words in message and "\n" not in message


def test_env_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SMSPARTNER_CONCURRENCY=7\n")
    assert load_settings({}).concurrency == 7


def test_api_key_from_file_and_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key").write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key").write_text("from-credentials")
    key = load_settings({"SMSPARTNER_API_KEY_FILE": str(tmp_path / "key")}).api_key
    assert key is not None and key.get_secret_value() == "from-file"
    key = load_settings({"CREDENTIALS_DIRECTORY": str(creds)}).api_key
    assert key is not None and key.get_secret_value() == "from-credentials"
    monkeypatch.setenv("SMSPARTNER_API_KEY", "direct-key")
    key = load_settings(
        {"SMSPARTNER_API_KEY": "direct-key", "CREDENTIALS_DIRECTORY": str(creds)}
    ).api_key
    assert key is not None and key.get_secret_value() == "direct-key"


def test_unreadable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SMSPARTNER_API_KEY_FILE: cannot read"):
        load_settings({"SMSPARTNER_API_KEY_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\xff\xfe\x00k\x00e\x00y\x00", "is not UTF-8 text (byte 0)"),
        (b"s" * (64 * 1024 + 1), "is larger than 64 KiB"),
    ],
    ids=["binary", "huge"],
)
@pytest.mark.parametrize("name", ["API_KEY", "HTTP_TOKEN", "DATABASE_URL"])
def test_a_secret_file_that_is_not_a_secret_is_a_clear_error(
    tmp_path: Path, name: str, content: bytes, words: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_settings({f"SMSPARTNER_{name}_FILE": str(secret)})
    assert str(raised.value) == (
        f"SMSPARTNER_{name}_FILE: {secret} {words}; it should hold the secret only"
        + (", as text" if "UTF-8" in words else "")
    )


def test_a_secret_file_as_endless_as_dev_zero_is_read_only_so_far(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SMSPARTNER_API_KEY_FILE: /dev/zero is larger than"):
        load_settings({"SMSPARTNER_API_KEY_FILE": "/dev/zero"})


@pytest.mark.parametrize("key", ["k", "1234567", "  abc  "])
def test_an_api_key_under_8_characters_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("SMSPARTNER_API_KEY", key)
    with pytest.raises(ConfigError) as raised:
        load_settings({})
    message = str(raised.value)
    assert message.startswith("SMSPARTNER_API_KEY: must be at least 8 characters (got ")
    assert key.strip() not in message.removeprefix("SMSPARTNER_API_KEY: ").split("(got ")[0]
    monkeypatch.setenv("SMSPARTNER_API_KEY", "12345678")
    assert load_settings({}).api_key is not None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("postgresql+asyncpg://u@db/x", "driver 'asyncpg' is not supported: an async driver"),
        ("postgresql+psycopg_async://u@db/x", "driver 'psycopg_async' is not supported: an async"),
        ("postgresql+pg8000://u@db/x", "driver 'pg8000' is not supported; use sqlite:///"),
        ("postgresql+psycopg2://u@db/x", "driver 'psycopg2' is not supported"),
        ("sqlite+pysqlcipher://:key@/x.db", "driver 'pysqlcipher' is not supported"),
        ("sqlite+aiosqlite:///x.db", "driver 'aiosqlite' is not supported: an async driver"),
    ],
)
def test_database_drivers_the_daemon_cannot_use_are_refused(url: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, database_url=url)
    assert str(raised.value).startswith(f"SMSPARTNER_DATABASE_URL: {words}")
    assert "pip install 'smspartner-status[postgres]'" in str(raised.value)


def test_a_driver_that_is_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("postgresql://u@db/x", "postgresql+psycopg://u@db/x", "sqlite:///x.db"):
        assert load_settings({}, database_url=url)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as `import psycopg` would fail
    with pytest.raises(ConfigError) as raised:
        load_settings({}, database_url="postgresql://u:pw@db/x")
    assert str(raised.value) == (
        "SMSPARTNER_DATABASE_URL: the driver for postgresql:// is not installed (psycopg); "
        "needs pip install 'smspartner-status[postgres]'"
    )


def test_secrets_are_hidden_from_repr_and_the_safe_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSPARTNER_API_KEY", "sekr1t-key")
    monkeypatch.setenv("SMSPARTNER_DATABASE_URL", "postgresql://app:pa55word@db/sms")
    s = load_settings({})
    assert "sekr1t-key" not in repr(s) and "pa55word" not in repr(s)
    assert "pa55word" not in s.safe_database_url
    assert set(s.secrets()) == {"sekr1t-key", "pa55word"}


def test_blank_secrets_count_as_unset(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SMSPARTNER_API_KEY=\nSMSPARTNER_HTTP_TOKEN=\n")
    s = load_settings({})
    assert s.api_key is None and s.http_token is None


def test_a_report_window_of_a_year_is_the_longest() -> None:
    assert load_settings({}, report_window_hours=8760).report_window == timedelta(days=365)
    with pytest.raises(ConfigError, match=r"^SMSPARTNER_REPORT_WINDOW_HOURS: must be at most"):
        load_settings({}, report_window_hours=8760.01)


def _key() -> str | None:
    key = load_settings().api_key
    return None if key is None else key.get_secret_value()


def test_a_secret_comes_from_the_environment_then_files_then_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment beats .env, and in each a variable beats its _FILE (README)."""
    for name in ("env-file", "creds/api_key", "dotenv-file"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"from-{name.partition('/')[0]}\n")
    dotenv = tmp_path / ".env"

    dotenv.write_text(f"SMSPARTNER_API_KEY_FILE={tmp_path / 'dotenv-file'}\n")
    assert _key() == "from-dotenv-file"
    dotenv.write_text(
        f"SMSPARTNER_API_KEY=from-dotenv\nSMSPARTNER_API_KEY_FILE={tmp_path / 'dotenv-file'}\n"
    )
    assert _key() == "from-dotenv"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert _key() == "from-creds"
    monkeypatch.setenv("SMSPARTNER_API_KEY_FILE", str(tmp_path / "env-file"))
    assert _key() == "from-env-file"
    monkeypatch.setenv("SMSPARTNER_API_KEY", "from-env")
    assert _key() == "from-env"

    # An empty variable counts as not set, wherever it is: compose's `${VAR:-}`.
    monkeypatch.setenv("SMSPARTNER_API_KEY", "")
    assert _key() == "from-env-file"
    for name in ("SMSPARTNER_API_KEY_FILE", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name)
    assert _key() == "from-dotenv"
    dotenv.write_text(f"SMSPARTNER_API_KEY= \nSMSPARTNER_API_KEY_FILE={tmp_path / 'dotenv-file'}\n")
    assert _key() == "from-dotenv-file"
    dotenv.write_text("SMSPARTNER_API_KEY=\n")
    assert _key() is None


def test_every_secret_follows_the_same_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("t0ken-from-file")
    (tmp_path / ".env").write_text(
        "SMSPARTNER_HTTP_TOKEN=t0ken-from-dotenv\n"
        "SMSPARTNER_DATABASE_URL=sqlite:///from-dotenv.db\n"
        f"SMSPARTNER_DATABASE_URL_FILE={tmp_path / 'missing'}\n"  # outranked: never read
    )
    monkeypatch.setenv("SMSPARTNER_HTTP_TOKEN_FILE", str(tmp_path / "token"))
    s = load_settings()
    assert s.http_token is not None and s.http_token.get_secret_value() == "t0ken-from-file"
    assert s.database_url.get_secret_value() == "sqlite:///from-dotenv.db"


def test_an_unreadable_file_named_in_dotenv_names_where_it_was_set(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"SMSPARTNER_API_KEY_FILE={tmp_path / 'missing'}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({})
    assert str(caught.value).startswith("SMSPARTNER_API_KEY_FILE (in .env): cannot read ")
    assert "No such file" in str(caught.value)
