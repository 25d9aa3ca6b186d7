"""Crash safety: SIGKILL the poller at random points while it ingests a big tag, restart,
and the database still ends equal to the provider's truth — no lost, duplicated or
regressed report. The default run uses 30,000 numbers; `-m slow` runs 100,000."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import sqlalchemy as sa

from daemon.simulator import Simulator
from daemon.status import map_provider_status
from tests.helpers import run_cli

SENT = "1764140000"  # 2025-11-26T06:53:20Z


def truth_items(n: int, resolved: bool) -> list[dict[str, object]]:
    """Every 10th number waits until ``resolved``; the rest are final from the start."""
    items: list[dict[str, object]] = []
    for i in range(n):
        waiting = i % 10 == 0 and not resolved
        items.append({
            "phoneNumber": f"+336{i:08d}",
            "status": "Waiting" if waiting else ("Delivered" if i % 7 else "Not delivered"),
            "stopSMS": i % 97 == 0 and not waiting,
            "date": SENT if waiting else str(int(SENT) + 60 + i % 3600),
        })  # fmt: skip
    return items


def kill_during_polls(
    env: dict[str, str], sim: Simulator, pages: int, kills: int, rng: random.Random
) -> int:
    """Start `poll` and SIGKILL it at a random point of its ingest, ``kills`` times.

    Half the kills land while pages are being fetched (after a random page), half while
    the transaction is being written (a random moment after the last page): the points
    where a crash could lose or half-write data. Returns how many polls were cut short.
    """
    killed = 0
    for attempt in range(kills):
        before = sim.request_count("big")
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "poll", "big"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        target = rng.randint(1, pages - 1) if attempt % 2 == 0 else pages
        deadline = time.monotonic() + 60
        while sim.request_count("big") - before < target and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        if attempt % 2:
            time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside the write
        if proc.poll() is None:
            proc.kill()
            killed += 1
        proc.wait()
    return killed


def check_database_equals(db: str, items: list[dict[str, object]]) -> None:
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        stored = {
            p: (s, bool(stop))
            for p, s, stop in conn.execute(
                sa.text("SELECT phone_number, status, stop_sms FROM delivery_statuses")
            )
        }
        events = conn.execute(
            sa.text(
                "SELECT phone_number, old_status, new_status FROM delivery_status_events "
                "ORDER BY id"
            )
        ).all()
        optouts = conn.execute(
            sa.text("SELECT phone_number, count(*) FROM stop_sms_optouts GROUP BY phone_number")
        ).all()
    engine.dispose()
    expected = {
        str(i["phoneNumber"]): (map_provider_status(str(i["status"])).value, bool(i["stopSMS"]))
        for i in items
    }
    assert stored == expected
    history: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
    for phone, old, new in events:
        history[phone].append((old, new))
    for phone, chain in history.items():
        assert chain[0][0] is None, (phone, chain)  # exactly one first sighting …
        assert all(old is not None for old, _ in chain[1:]), (phone, chain)
        for (_, prev_new), (old, _) in itertools.pairwise(chain):
            assert old == prev_new, (phone, chain)  # … and an unbroken chain
        assert chain[-1][1] == stored[phone][0], (phone, chain)
    assert set(history) == set(stored)
    assert all(count == 1 for _, count in optouts)
    assert {p for p, _ in optouts} == {p for p, (_, stop) in expected.items() if stop}


@pytest.mark.parametrize(
    "numbers", [30_000, pytest.param(100_000, marks=pytest.mark.slow)], ids=["30k", "100k"]
)
def test_sigkill_mid_ingest_loses_and_duplicates_nothing(
    cli_env: dict[str, str], simulator: Simulator, numbers: int
) -> None:
    rng = random.Random(numbers)
    env = {**cli_env, "SMSPARTNER_MAX_PAGES": "1000"}
    first, later = truth_items(numbers, False), truth_items(numbers, True)
    simulator.set_items("big", first, page_size=1000)
    assert run_cli("track", "big", env=env).code == 0

    pages = numbers // 1000
    killed = kill_during_polls(env, simulator, pages, kills=4, rng=rng)
    assert run_cli("poll", "big", env=env, timeout=120).code == 0
    check_database_equals(env["SMSPARTNER_DATABASE_URL"], first)

    simulator.set_items("big", later, page_size=1000)  # the waiting tenth resolves
    killed += kill_during_polls(env, simulator, pages, kills=3, rng=rng)
    assert run_cli("poll", "big", env=env, timeout=120).code == 0
    check_database_equals(env["SMSPARTNER_DATABASE_URL"], later)
    assert killed >= 5  # the kills really cut polls short
