"""A deadline for a whole HTTP request, not for each read.

httpx's timeouts apply to each network operation: a server that sends one byte every
two seconds never trips a 10 s read timeout, and holds the request, and the worker
thread waiting on it, for as long as it likes (181 bytes took six minutes). Nor can a
read already blocked notice that the daemon has begun to stop. So :mod:`daemon.smspartner`
arms a :class:`Watchdog` around each request with a deadline, and the watchdog's thread
shuts the request's socket down (``shutdown(SHUT_RDWR)``) once that deadline has passed.
A blocked ``recv`` returns at once, httpx raises, and the client turns that into our
error. The deadline is a callable, read again at every check, because the daemon's
shutdown deadline only appears when SIGTERM arrives, in the middle of a request.

Finding the socket: httpx names a request's connection only once the response headers
have arrived (``response.extensions["network_stream"]``), so the watchdog also listens
to httpcore's ``trace`` extension, which reports each connection it opens
(``connect_tcp``/``start_tls``). What remains unknown is a kept-alive connection that is
still waiting for the headers: the pool does not say which of its connections it picked.
When such a request is past its deadline the watchdog shuts down every connection it knows
that no other request is known to be using: idle ones (the pool drops them and opens new
ones) and, rarely, another request's kept-alive connection also waiting for its headers,
which then fails as a transient error and is retried within its own budget. That is rare
(a request must overrun first) and costs one retry; a provider holding a worker for
minutes is the alternative.

With ``httpx.MockTransport`` there is no socket: the watchdog has nothing to cut, and
the client's own checks (between chunks, after the request) still apply.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final

__all__ = ["Guard", "Watchdog"]

#: Longest the watchdog sleeps while requests are armed: a deadline that moves earlier
#: (SIGTERM) is noticed within this.
TICK: Final = 0.2
#: How long the thread waits with nothing armed before it ends (the next arm restarts it).
IDLE_EXIT: Final = 5.0
#: httpcore trace events that hand over a connection just opened for this request.
_OPENED: Final = ("connect_tcp.complete", "start_tls.complete")


class Guard:
    """One armed request: its deadline and, once known, its connection.

    Attributes:
        fired: the watchdog found the request past its deadline and cut its connection
            (or every unclaimed one, see the module docstring).
    """

    def __init__(self, watchdog: Watchdog, deadline: Callable[[], float]) -> None:
        self._watchdog = watchdog
        self.deadline = deadline
        self.stream: Any = None
        self.fired = False

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's ``trace`` extension: learn the connection the request opens."""
        if event.endswith(_OPENED):
            self._watchdog.attach(self, info.get("return_value"))

    def attach(self, stream: Any) -> None:
        """Name the request's connection (``response.extensions["network_stream"]``)."""
        self._watchdog.attach(self, stream)


class Watchdog:
    """Cuts the connection of any armed request past its deadline.

    One per API client, shared by its worker threads; its thread runs only while
    requests are armed (it ends after :data:`IDLE_EXIT` seconds with none).

    Args:
        monotonic: the clock deadlines are on (injected by tests).
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._armed: set[Guard] = set()
        # Every connection we have seen, for the unknown-connection case; weak, so the
        # pool closing one lets it go.
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def armed(self, deadline: Callable[[], float]) -> Iterator[Guard]:
        """Watch one request for as long as the ``with`` block lasts.

        Args:
            deadline: when the request must be over, on the ``monotonic`` clock; read
                again at every check, so it may move earlier while the request runs.
        """
        guard = Guard(self, deadline)
        with self._cond:
            self._armed.add(guard)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield guard
        finally:
            with self._cond:
                self._armed.discard(guard)

    def attach(self, guard: Guard, stream: Any) -> None:
        """Record ``stream`` as ``guard``'s connection; cut it now if the guard fired."""
        if stream is None:
            return
        with self._cond:
            guard.stream = stream
            with contextlib.suppress(TypeError):  # not weak-referenceable: not a socket
                self._streams.add(stream)
            if guard.fired and guard in self._armed:
                _cut(stream)

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._armed:
                    self._cond.wait(IDLE_EXIT)
                    if not self._armed:
                        self._thread = None
                        return
                    continue
                now = self._monotonic()
                next_check = TICK
                for guard in list(self._armed):
                    if guard.fired:
                        continue
                    left = guard.deadline() - now
                    if left <= 0:
                        self._fire(guard)
                    else:
                        next_check = min(next_check, left)
                self._cond.wait(max(next_check, 0.01))

    def _fire(self, guard: Guard) -> None:
        """Cut ``guard``'s connection, or every connection no other request holds."""
        guard.fired = True
        if guard.stream is not None:
            _cut(guard.stream)
            return
        held = {id(other.stream) for other in self._armed if other.stream is not None}
        for stream in list(self._streams):
            if id(stream) not in held:
                _cut(stream)


def _cut(stream: Any) -> None:
    """Shut a connection's socket down, which wakes a thread blocked reading it."""
    try:
        sock = stream.get_extra_info("socket")
    except Exception:  # a stream we cannot inspect is one we cannot cut
        return
    if isinstance(sock, socket.socket):
        # The plain socket's shutdown, even for TLS: ``SSLSocket.shutdown`` also drops
        # its SSL object, which the thread still reading may trip over.
        with contextlib.suppress(OSError):  # already closed
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
