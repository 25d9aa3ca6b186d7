"""Fixtures for integration tests: a poller wired to the simulator and a fresh database."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from daemon import queries, tracking
from daemon.answers import Answers
from daemon.app import App
from daemon.health import Health
from daemon.poller import Poller
from daemon.scheduler import Daemon
from daemon.settings import load_settings
from daemon.simulator import Simulator
from tests.helpers import API_KEY, Running

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@dataclass
class Clock:
    """A clock the test moves by hand."""

    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Rig:
    """A poller wired to the simulator and a fresh database, built by ``app``."""

    engine: Engine
    poller: Poller
    clock: Clock
    sim: Simulator
    app: App
    #: Apps of the daemons this rig made, closed with the rig's own.
    made: list[App] = field(default_factory=list)

    def daemon(self, health: Health | None = None, concurrency: int = 1) -> Daemon:
        """A new daemon on this rig's settings, clock and answers (each call a new one,
        as a restarted process would be); ``health`` to read what it reports."""
        app = App(
            self.app.settings.model_copy(update={"concurrency": concurrency}),
            clock=self.clock,
            answers=self.app.answers,
            health=health,
        )
        self.made.append(app)
        return app.daemon

    def track(self, tag: str, sent_at: datetime | None = None) -> None:
        sent = sent_at or self.clock.now
        with self.engine.begin() as conn:
            tracking.track(
                conn,
                tag,
                sent_at=sent,
                window_ends_at=sent + timedelta(hours=48),
                now=self.clock.now,
            )

    def rows(self, tag: str) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            return {r["phone_number"]: dict(r) for r in queries.numbers(conn, tag)}

    def count(self, table: sa.Table) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


@pytest.fixture
def rig(db_url: str, simulator: Simulator) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def build(*, remember: bool = True, **overrides: Any) -> Rig:
        """A rig with these settings; ``remember=False`` re-polls every number in full."""
        values: dict[str, Any] = dict(
            api_key=API_KEY,
            base_url=simulator.url,
            database_url=db_url,
            retry_backoff_seconds=0.01,
            rate_limit_per_second=0,
            max_retries=4,
        )
        values.update(overrides)
        clock = Clock()
        # Every tag's answer is remembered, however small: each re-poll in these tests
        # takes the path a large tag takes in the daemon (see daemon/answers.py).
        answers = Answers(min_numbers=1 if remember else sys.maxsize)
        app = App(load_settings({}, **values), clock=clock, answers=answers)
        rigs.append(Rig(app.engine, app.poller, clock, simulator, app))
        return rigs[-1]

    yield build
    for rig in rigs:
        for app in (*rig.made, rig.app):
            app.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(env: dict[str, str], *args: str) -> Running:
        proc = Running(env, tmp_path / f"daemon{len(started)}.log", *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
        proc._out.close()


@pytest.fixture
def stopping() -> Iterator[list[Daemon]]:
    """Daemons the test appends here are stopped at its end (their pools shut down)."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()
