"""Where the settings come from: the environment, ``.env`` and secret files.

Standard library only (python-dotenv only when a ``.env`` file exists), so that
``check``, which needs nothing but the database URL to find the heartbeat, reads it
exactly as the daemon does without building the whole :class:`~daemon.settings.Settings`
(pydantic-settings alone costs several times Python's own start).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from daemon.errors import ConfigError

ENV_PREFIX = "SMSPARTNER_"
#: The ``.env`` file read from the working directory.
DOTENV = ".env"
#: Settings that may be read from files (``*_FILE`` or systemd credentials).
SECRET_FIELDS = ("api_key", "http_token", "database_url")
#: The most of a secret's file read: a key, a token or a URL, not a disk image.
MAX_SECRET_FILE_BYTES = 64 * 1024
#: Where the data goes when ``SMSPARTNER_DATABASE_URL`` is not set.
DEFAULT_DATABASE_URL = "sqlite:///smspartner-status.db"


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Secrets that files (and ``.env``) set, for those the environment does not set
    (see :func:`_secret_values`); ``environ`` defaults to ``os.environ``.

    Raises:
        ConfigError: a file named by one of these cannot be read.
    """
    environ = os.environ if environ is None else environ
    return _secret_values(environ, _read_dotenv())


def database_url(environ: Mapping[str, str] | None = None) -> str:
    """The database URL the settings would hold, without validating it.

    Raises:
        ConfigError: the file it is read from cannot be read.
    """
    environ = os.environ if environ is None else environ
    name = ENV_PREFIX + "DATABASE_URL"
    # pydantic-settings matches variable names case-insensitively; so does this.
    given = {k.upper(): v for k, v in environ.items() if k.upper() == name}
    if _is_set(given, name):
        return given[name]
    found = _secret_values(environ, _read_dotenv()).get("database_url")
    if found is not None:
        return found
    return given.get(name, DEFAULT_DATABASE_URL)


def _secret_values(environ: Mapping[str, str], dotenv: Mapping[str, str]) -> dict[str, str]:
    """Secrets that files (and ``.env``) set, for those the environment does not set.

    A secret comes from the first of these that is set (a blank value counts as unset):

    1. ``SMSPARTNER_<NAME>`` in the environment;
    2. the file named by ``SMSPARTNER_<NAME>_FILE`` in the environment;
    3. ``$CREDENTIALS_DIRECTORY/<name>`` (systemd's ``LoadCredential=``);
    4. ``SMSPARTNER_<NAME>`` in ``.env``;
    5. the file named by ``SMSPARTNER_<NAME>_FILE`` in ``.env``.

    That is: the environment beats ``.env`` (what the service manager or the shell says
    for this run beats a file lying in the working directory), and in each the variable
    beats its ``_FILE``. pydantic-settings reads 1 itself; what is returned here becomes
    an init argument, which it ranks above the environment, so nothing is returned for a
    secret that 1 sets.

    Args:
        environ: the process environment.
        dotenv: the ``.env`` file's variables, names in upper case.

    Raises:
        ConfigError: a file named by one of these cannot be read.
    """
    found: dict[str, str] = {}
    creds = environ.get("CREDENTIALS_DIRECTORY")
    for name in SECRET_FIELDS:
        env_name = ENV_PREFIX + name.upper()
        file_name = env_name + "_FILE"
        path: Path | None = None
        source = file_name
        if _is_set(environ, env_name):
            continue
        if _is_set(environ, file_name):
            path = Path(environ[file_name])
        elif creds and (Path(creds) / name).is_file():
            path, source = Path(creds) / name, "$CREDENTIALS_DIRECTORY"
        elif _is_set(dotenv, env_name):
            # pydantic-settings would read it too, but an empty SMSPARTNER_<NAME> in the
            # environment (compose's `${VAR:-}`) would beat it there.
            found[name] = dotenv[env_name]
            continue
        elif _is_set(dotenv, file_name):
            path, source = Path(dotenv[file_name]), f"{file_name} (in .env)"
        if path is None:
            continue
        found[name] = _read_secret_file(path, source)
    return found


def _read_secret_file(path: Path, source: str) -> str:
    """A secret's file as text: UTF-8, at most :data:`MAX_SECRET_FILE_BYTES`, stripped.

    Raises:
        ConfigError: naming ``source`` (the variable) when the file cannot be read, is
            too large (``/dev/zero``), or is not text; never quoting its content.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(
            f"{source}: {path} is larger than {MAX_SECRET_FILE_BYTES // 1024} KiB; "
            "it should hold the secret only"
        )
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: {path} is not UTF-8 text (byte {exc.start}); it should hold the "
            "secret only, as text"
        ) from None


def _is_set(variables: Mapping[str, str | None], name: str) -> bool:
    value = variables.get(name)
    return value is not None and bool(value.strip())


def _read_dotenv() -> dict[str, str]:
    """The ``.env`` file pydantic-settings reads (names upper-cased, as it matches them
    case-insensitively); empty when there is none."""
    path = Path(DOTENV)
    if not path.is_file():
        return {}
    from dotenv import dotenv_values  # only when there is a file to read

    return {k.upper(): v for k, v in dotenv_values(path).items() if v is not None}
