"""SIGTERM while the main thread holds a lock the stop needs (a logger's, say)."""

from __future__ import annotations

import os
import signal
import threading
import time

from daemon.signals import SignalWatch


def test_the_stop_runs_even_when_the_signal_lands_inside_a_lock_it_needs() -> None:
    # A handler run in the main thread would wait for this lock forever: the main thread
    # holds it while the handler runs (structlog's print lock hung `run` that way).
    assert threading.current_thread() is threading.main_thread()
    lock, done, seen = threading.Lock(), threading.Event(), []
    before = signal.getsignal(signal.SIGTERM)

    def stop(name: str) -> None:
        with lock:
            seen.append(name)
        done.set()

    with SignalWatch(stop):
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the interpreter runs the handler here, lock held
            assert not done.is_set()
        assert done.wait(5)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the same stop, no KeyboardInterrupt
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == ["SIGTERM", "SIGINT"]
    assert signal.getsignal(signal.SIGTERM) is before  # handed back on exit
