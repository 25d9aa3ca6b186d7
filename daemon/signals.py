"""SIGTERM and SIGINT, handled on a thread of their own.

A Python signal handler runs in the main thread between two of its bytecodes, whatever
that thread holds at the time. A handler that logs, or sets a ``threading.Event``, can
block on a lock the interrupted code already holds, structlog's print lock for one: the
process then hangs on SIGTERM instead of stopping. So the handler installed here does
nothing; the interpreter writes the signal's number to a socket
(:func:`signal.set_wakeup_fd`), and a watcher thread reads it and runs the action like
any other code, taking whatever locks it needs.

Standard library only.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

#: The signals that stop a run.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _nothing(_signum: int, _frame: FrameType | None) -> None:
    """The Python-level handler: the work is the watcher's (see the module docstring)."""


class SignalWatch:
    """Call ``action(signal name)`` on a watcher thread for each SIGTERM or SIGINT.

    Use it as a context manager, from the main thread (the only one Python installs
    handlers from). On exit the previous handlers come back, unless ``keep`` is set: a
    second SIGTERM during the last steps of ``run`` must not kill it half-way.

    Args:
        action: called with ``"SIGTERM"`` or ``"SIGINT"``, once per signal received.
        keep: leave the handlers in place on exit (for the rest of the process).
    """

    def __init__(self, action: Callable[[str], None], *, keep: bool = False) -> None:
        self._action = action
        self._keep = keep
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # the interpreter's write must never block
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._thread = threading.Thread(target=self._watch, name="signals", daemon=True)

    def __enter__(self) -> SignalWatch:
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, _nothing) for sig in STOP_SIGNALS}
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        if not self._keep:
            for sig, old in self._previous.items():
                signal.signal(sig, old)  # type: ignore[arg-type]
            signal.set_wakeup_fd(self._previous_fd)
            self._writer.close()  # the watcher reads the end of the stream and returns
            self._thread.join()
            self._reader.close()

    def _watch(self) -> None:
        while received := self._reader.recv(64):
            for signum in received:
                if signum in STOP_SIGNALS:
                    self._action(signal.Signals(signum).name)
