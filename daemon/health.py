"""What the daemon tells its supervisors: liveness, readiness, the heartbeat file read
by ``smspartner-status check``, and systemd's ``sd_notify`` protocol.

The scheduler writes to :class:`Health`; the HTTP server and ``check`` only read it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

from daemon.errors import ConfigError

#: The loop beats every few seconds; missing this many seconds of beats means stuck.
LIVENESS_TIMEOUT = timedelta(seconds=60)
#: Polls started and none succeeding for this long make the daemon unready: whether they
#: fail, crash, hit a resource limit (no file descriptors left) or never end.
FAILING_TOLERANCE = timedelta(minutes=15)


class Health:
    """Thread-safe health state shared by the scheduler and the HTTP server.

    Readiness asks whether polls succeed, not only whether some finish: the scheduler
    says when each poll starts and how it ended, and the daemon is unready once tags
    have been due for :data:`FAILING_TOLERANCE` without one successful poll. Polls
    still running count as waiting, so workers stuck on a hanging provider, or tags
    whose polls keep failing while healthy ones cannot get a worker, show up too. An
    idle daemon (nothing due, nothing failing) stays ready.
    """

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat: datetime | None = None
        self._db_error: str | None = None
        self._auth_error: str | None = None
        #: Since when polls have been started or failing with no success since; None
        #: when the last poll to end succeeded and none is running.
        self._waiting_since: datetime | None = None
        self._running = 0
        self.last_success_at: datetime | None = None

    def beat(self) -> None:
        """The scheduler loop is alive."""
        with self._lock:
            self._last_beat = self._clock()

    def database(self, error: str | None) -> None:
        """Record whether the database answered (None) or failed (the error)."""
        with self._lock:
            self._db_error = error

    def auth(self, error: str | None) -> None:
        """Record that the API key was rejected (the error) or accepted again (None)."""
        with self._lock:
            self._auth_error = error

    def poll_started(self) -> None:
        """A tag was due and a poll of it starts; :meth:`poll_finished` follows."""
        now = self._clock()
        with self._lock:
            self._running += 1
            if self._waiting_since is None:
                self._waiting_since = now

    def poll_finished(self, ok: bool) -> None:
        """Record the outcome of one poll (crashed or abandoned ones are not ``ok``)."""
        now = self._clock()
        with self._lock:
            self._running = max(0, self._running - 1)
            if ok:
                self.last_success_at = now
                # Polls still running wait from now on; none running: nothing waits.
                self._waiting_since = now if self._running else None
            elif self._waiting_since is None:
                self._waiting_since = now

    @property
    def auth_error(self) -> str | None:
        """The current API key problem, if any (pauses polling)."""
        with self._lock:
            return self._auth_error

    @property
    def last_beat(self) -> datetime | None:
        """When the scheduler loop last beat (None before its first beat); the status
        page shows it."""
        with self._lock:
            return self._last_beat

    def alive(self) -> bool:
        """Whether the scheduler loop beat recently."""
        with self._lock:
            beat = self._last_beat
        return beat is not None and self._clock() - beat < LIVENESS_TIMEOUT

    def problems(self) -> list[str]:
        """Why the daemon is not ready (empty when it is)."""
        now = self._clock()
        with self._lock:
            found = []
            if self._last_beat is None or now - self._last_beat >= LIVENESS_TIMEOUT:
                found.append("scheduler loop not running")
            if self._db_error:
                found.append(f"database unreachable: {self._db_error}")
            if self._auth_error:
                found.append(f"API key rejected: {self._auth_error}")
            since = self._waiting_since
            if since is not None and now - since >= FAILING_TOLERANCE:
                minutes = int((now - since).total_seconds() // 60)
                found.append(
                    f"no poll has succeeded for {minutes} min although tags are due "
                    f"(since {since.isoformat()}; {self._running} poll(s) running)"
                )
            return found


# --- heartbeat file (for `check`, e.g. a Docker HEALTHCHECK) ------------------------------
#
# The file lives in a directory only this user can write: systemd's RuntimeDirectory=,
# else the session's $XDG_RUNTIME_DIR, else one we create (mode 0700) in the temporary
# directory. In a shared /tmp under a predictable name anyone could write a future
# timestamp (a dead daemon looking healthy) or plant a symlink at the temporary name (a
# daemon running as root then overwrote a file of their choice). So every access opens
# the directory without following a symlink, checks that it is ours and private, and
# works relative to that open directory; files are opened with O_NOFOLLOW, and the
# temporary one with O_EXCL, so nothing planted there is ever followed.

#: The most of a heartbeat file read: an ISO-8601 timestamp is 32 characters.
_HEARTBEAT_MAX_BYTES = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class HeartbeatDirError(OSError):
    """The heartbeat directory is not private: a symlink, another user's, or writable
    by others. An OSError, so the scheduler's handling of a heartbeat it cannot write
    (one warning, polling goes on) covers it; ``strerror`` says what is wrong."""


def heartbeat_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The private directory of the heartbeat file (no I/O).

    ``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``; the first when it lists
    several), else ``$XDG_RUNTIME_DIR``, else ``<tempdir>/smspartner-status-<uid>``,
    which :func:`write_heartbeat` creates with mode 0700.
    """
    environ = os.environ if environ is None else environ
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime)
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"])
    return Path(tempfile.gettempdir()) / f"smspartner-status-{os.geteuid()}"


def heartbeat_path(database_url: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where `run` writes its heartbeat: one file per database, in :func:`heartbeat_dir`.

    Keyed by a hash of the URL so daemons on different databases never share a file,
    and so the path reveals nothing of the URL (which may hold a password).
    """
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return heartbeat_dir(environ) / f"smspartner-status-{digest}.heartbeat"


def _open_private_dir(directory: Path, *, create: bool = False) -> int:
    """Open ``directory`` (never through a symlink) and check that it is private.

    Returns:
        A file descriptor of the directory, for the caller to close.

    Raises:
        HeartbeatDirError: a symlink, not ours, or writable by group or others.
        OSError: it is missing (and ``create`` is false), or cannot be created or opened.
    """
    if create:
        with contextlib.suppress(FileExistsError):  # checked below, whoever made it
            os.mkdir(directory, 0o700)
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not directory.is_symlink():
            raise
        raise HeartbeatDirError(
            exc.errno, f"heartbeat directory {directory} is a symlink; refusing it"
        ) from None
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    if problem:
        os.close(fd)
        raise HeartbeatDirError(
            errno.EPERM,
            f"heartbeat directory {directory} {problem}; refusing it (make it private, or "
            "point RUNTIME_DIRECTORY or XDG_RUNTIME_DIR at a private directory)",
        )
    return fd


def prepare_heartbeat(path: Path) -> None:
    """Create the heartbeat's directory if missing and check it is private (``run``, at
    start: a directory someone else controls is refused in one clear line).

    A directory that cannot be created (a read-only ``/tmp``) is left to the scheduler,
    which warns and keeps polling: only ``check`` needs the heartbeat.

    Raises:
        ConfigError: the directory exists but is not private.
    """
    try:
        os.close(_open_private_dir(path.parent, create=True))
    except HeartbeatDirError as exc:
        raise ConfigError(str(exc.strerror)) from None
    except OSError:
        pass


def write_heartbeat(path: Path, now: datetime) -> None:
    """Atomically record that the loop is alive at ``now``.

    A temporary file created with ``O_EXCL | O_NOFOLLOW`` in the open private directory,
    then renamed over the heartbeat: replicas on one host may share the file, and a
    reader never sees half a timestamp.

    Raises:
        OSError: the directory is not private (:class:`HeartbeatDirError`), or the file
            cannot be written.
    """
    tmp = f"{path.name}.{os.getpid()}.tmp"  # one per process: replicas may share the dir
    dir_fd = _open_private_dir(path.parent, create=True)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            # Left by a process of ours killed mid-write (a container's PID 1 has the
            # same pid at every start): the directory is private, so it is ours to drop.
            os.unlink(tmp, dir_fd=dir_fd)
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(now.isoformat())
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _read_heartbeat(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as handle:
        return handle.read(_HEARTBEAT_MAX_BYTES).decode("utf-8", errors="replace").strip()


def remove_heartbeat(path: Path, last: datetime) -> None:
    """Delete the heartbeat at a clean stop, so ``check`` fails at once, not a minute later.

    Only while the file still holds this daemon's ``last`` beat: another daemon on the
    same database and host beating since keeps its file. A crash leaves the file, which
    goes stale within :data:`LIVENESS_TIMEOUT`. Never raises.
    """
    try:
        dir_fd = _open_private_dir(path.parent)
    except OSError:
        return  # gone, or not ours: nothing of ours to remove
    try:
        if _read_heartbeat(dir_fd, path.name) == last.isoformat():
            os.unlink(path.name, dir_fd=dir_fd)
    except OSError:
        pass  # gone already, or unreadable: nothing of ours to remove
    finally:
        os.close(dir_fd)


def read_heartbeat(path: Path) -> datetime | None:
    """The last beat recorded, or None when there is none (or it is not a timestamp).

    Raises:
        HeartbeatDirError: the directory is not private: what it holds proves nothing.
    """
    try:
        dir_fd = _open_private_dir(path.parent)
    except HeartbeatDirError:
        raise
    except OSError:  # no directory yet: no daemon ever beat here
        return None
    try:
        beat = datetime.fromisoformat(_read_heartbeat(dir_fd, path.name))
    except (OSError, ValueError):
        return None
    finally:
        os.close(dir_fd)
    return beat if beat.tzinfo is not None else None


def heartbeat_age(path: Path, now: datetime) -> timedelta | None:
    """How old the last heartbeat is (negative when it claims to come from the future),
    or None when there is none (or it is unreadable).

    Raises:
        HeartbeatDirError: the directory is not private.
    """
    beat = read_heartbeat(path)
    return None if beat is None else now - beat


# --- systemd notify ----------------------------------------------------------------------------


class Notifier:
    """sd_notify(3) without libsystemd: datagrams to ``$NOTIFY_SOCKET`` (a no-op when unset)."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        if path and path.startswith("@"):  # abstract namespace socket
            path = "\0" + path[1:]
        self._path = path or None

    @property
    def enabled(self) -> bool:
        """Whether a supervisor is listening."""
        return self._path is not None

    def notify(self, message: str) -> None:
        """Send one state line (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``…); never raises."""
        if self._path is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self._path)
        except OSError:
            pass  # a supervisor that went away must not take the daemon down
