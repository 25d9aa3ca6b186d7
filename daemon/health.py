"""What the daemon tells its supervisors: liveness, readiness, the heartbeat file read
by ``smspartner-status check``, and systemd's ``sd_notify`` protocol.

The scheduler writes to :class:`Health`; the HTTP server and ``check`` only read it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

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


def heartbeat_path(database_url: str) -> Path:
    """Where `run` writes its heartbeat: one file per database, in the temp directory.

    Keyed by a hash of the URL so daemons on different databases never share a file,
    and so the path reveals nothing of the URL (which may hold a password).
    """
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"smspartner-status-{digest}.heartbeat"


def write_heartbeat(path: Path, now: datetime) -> None:
    """Atomically record that the loop is alive at ``now``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # replicas may share the dir
    tmp.write_text(now.isoformat(), encoding="utf-8")
    tmp.replace(path)


def remove_heartbeat(path: Path, last: datetime) -> None:
    """Delete the heartbeat at a clean stop, so ``check`` fails at once, not a minute later.

    Only while the file still holds this daemon's ``last`` beat: another daemon on the
    same database and host beating since keeps its file. A crash leaves the file, which
    goes stale within :data:`LIVENESS_TIMEOUT`. Never raises.
    """
    try:
        if path.read_text(encoding="utf-8").strip() == last.isoformat():
            path.unlink()
    except OSError:
        pass  # gone already, or unreadable: nothing of ours to remove


def heartbeat_age(path: Path, now: datetime) -> timedelta | None:
    """How old the last heartbeat is, or None when there is none (or it is unreadable)."""
    try:
        beat = datetime.fromisoformat(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    return now - beat


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
