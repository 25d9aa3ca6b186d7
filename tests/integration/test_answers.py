"""Re-polls of a remembered tag (daemon/answers.py): they store exactly what a full
re-poll stores, and poll in full whenever something else wrote the tag."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from daemon import queries, tracking
from daemon.db import delivery_status_events, delivery_statuses, stop_sms_optouts
from daemon.poller import PollResult
from tests.helpers import unix
from tests.integration.conftest import NOW, Rig


def item(phone: str, status: str, date: datetime, stop: object = False) -> dict[str, object]:
    return {"phoneNumber": phone, "status": status, "stopSMS": stop, "date": unix(date)}


def first_answer(n: int = 300) -> list[dict[str, object]]:
    """A send an hour old: most delivered, every 10th waiting, some failed or STOP."""
    items = []
    for i in range(n):
        phone = f"+336{i:08d}"
        if i % 10 == 0:
            items.append(item(phone, "Waiting", NOW))
        elif i % 25 == 1:
            items.append(item(phone, "Not delivered", NOW + timedelta(seconds=40)))
        else:
            items.append(item(phone, "Delivered", NOW + timedelta(seconds=30), i % 97 == 0))
    return items


def later_answer(n: int = 300) -> list[dict[str, object]]:
    """The same send later: each kind of change the provider can make, once or more."""
    items = first_answer(n)
    late = NOW + timedelta(minutes=20)
    items[0] = item("+33600000000", "Delivered", late)  # waiting → delivered
    items[10] = item("+33600000010", "Not delivered", late)  # waiting → failed
    items[20] = item("+33600000020", "Sent", late)  # waiting → unknown
    items[30] = item("+33600000030", "Waiting", late)  # a later Waiting: date moves on
    items[2] = item("+33600000002", "Delivered", NOW + timedelta(seconds=30), "1")  # STOP on
    items[3] = item("+33600000003", "Waiting", NOW)  # a final status never regresses
    items[4] = item("+33600000004", "Not delivered", NOW)  # an older final report
    items[5] = {"phoneNumber": "+33600000005", "status": None}  # malformed: skipped
    del items[6]  # a number the provider stops listing
    items.append(item("+33699999999", "Waiting", late))  # a number sent later
    items.append(item("+33600000040", "Delivered", late))  # twice in one answer
    return items


def last_answer(n: int = 300) -> list[dict[str, object]]:
    """Everything resolved, with one number's report flip-flopping back."""
    items = later_answer(n)
    last = NOW + timedelta(minutes=50)
    for i, raw in enumerate(items):
        if raw.get("status") in ("Waiting", "Sent"):
            items[i] = item(str(raw["phoneNumber"]), "Delivered", last)
    items[0] = item("+33600000000", "Waiting", NOW)
    return items


def numbers_in(answer: list[dict[str, object]]) -> int:
    """How many numbers an answer lists with a well-formed item."""
    return len({raw["phoneNumber"] for raw in answer if raw.get("status") is not None})


def stored(r: Rig, tag: str) -> dict[str, Any]:
    """Everything a user sees of a tag, without the tag's name."""
    ev = delivery_status_events.c
    with r.engine.connect() as conn:
        events = conn.execute(
            sa.select(ev.phone_number, ev.old_status, ev.new_status, ev.reported_at).where(
                ev.tag == tag
            )
        ).all()
        optouts = conn.execute(
            sa.select(stop_sms_optouts.c.phone_number, stop_sms_optouts.c.reported_at).where(
                stop_sms_optouts.c.tag == tag
            )
        ).all()
        summary = dict(queries.tag_summary(conn, tag)[0])
    del summary["tag"]
    return {
        "rows": r.rows(tag),
        "events": Counter(tuple(e) for e in events),
        "optouts": sorted(tuple(o) for o in optouts),
        "summary": summary,
    }


def outcome(result: PollResult) -> tuple[object, ...]:
    return (
        result.state,
        result.numbers_seen,
        result.changed,
        result.events,
        result.optouts,
        result.skipped,
        result.counts,
        sorted(result.final_delays),
    )


def test_a_remembered_re_poll_stores_exactly_what_a_full_one_does(
    rig: Callable[..., Rig], debug_logs: None
) -> None:
    warm, cold = rig(), rig(remember=False)
    for r, tag in ((warm, "warm"), (cold, "cold")):
        r.track(tag, sent_at=NOW - timedelta(hours=1))
    for answer in (first_answer(), later_answer(), later_answer(), last_answer()):
        warm.sim.set_items("warm", answer, page_size=100)
        cold.sim.set_items("cold", answer, page_size=100)
        with capture_logs() as logs:
            remembered = warm.poller.poll("warm")
        full = cold.poller.poll("cold")
        assert outcome(remembered) == outcome(full)
        assert stored(warm, "warm") == stored(cold, "cold")
        for r in (warm, cold):
            r.clock.now += timedelta(minutes=20)
        stops = [e for e in logs if e["event"] == "api.pagination_stopped"]
        repeated = stops[0]["repeated"]
    # The last poll parsed only the ~35 items that changed, of 300.
    assert remembered.numbers_seen - 40 <= repeated < remembered.numbers_seen


def test_a_tag_emptied_and_tracked_again_is_stored_again_in_full(
    rig: Callable[..., Rig],
) -> None:
    # What `prune` does to an untracked tag, then `track`: the next poll must not trust
    # what it remembers of the tag's numbers.
    r = rig()
    r.track("again")
    r.sim.set_items("again", first_answer(), page_size=100)
    assert r.poller.poll("again").changed == 300
    with r.engine.begin() as conn:
        tracking.untrack(conn, "again", now=r.clock.now)
        conn.execute(sa.delete(delivery_statuses).where(delivery_statuses.c.tag == "again"))
    r.clock.now += timedelta(minutes=5)
    r.track("again", sent_at=NOW)
    result = r.poller.poll("again")
    assert (result.changed, result.numbers_seen) == (300, 300)
    assert len(r.rows("again")) == 300


def test_another_poll_of_the_tag_between_two_polls_is_noticed(rig: Callable[..., Rig]) -> None:
    # Two replicas on one database: the second one's poll moves the tag's marker.
    mine, other = rig(), rig()
    mine.track("shared")
    mine.sim.set_items("shared", first_answer(), page_size=100)
    mine.poller.poll("shared")
    mine.sim.set_items("shared", later_answer(), page_size=100)
    other.clock.now += timedelta(minutes=5)
    assert other.poller.poll("shared").changed > 0
    with mine.engine.begin() as conn:  # and then a hand edit, as a prune would do
        conn.execute(sa.delete(delivery_statuses).where(delivery_statuses.c.tag == "shared"))
    mine.clock.now += timedelta(minutes=10)
    before = mine.sim.request_count("shared")
    result = mine.poller.poll("shared")
    assert result.numbers_seen == len(mine.rows("shared")) == numbers_in(later_answer())
    # Noticed before fetching: one fetch of the tag's pages, not two.
    assert mine.sim.request_count("shared") - before == result.pages


def test_a_write_during_the_fetch_makes_the_poll_start_again_in_full(
    rig: Callable[..., Rig],
) -> None:
    r = rig()
    r.track("race")
    r.sim.set_items("race", first_answer(), page_size=100)
    r.poller.poll("race")
    r.sim.inject("slow", tag="race", seconds=1.0)
    r.clock.now += timedelta(minutes=5)
    before = r.sim.request_count("race")  # the requests of one full poll
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(r.poller.poll, "race")
        deadline = time.monotonic() + 10
        while r.sim.request_count("race") == before and time.monotonic() < deadline:
            time.sleep(0.01)  # until the poll's first request is on its way
        with r.engine.begin() as conn:  # untrack, prune, track again: all mid-fetch
            tracking.untrack(conn, "race", now=r.clock.now)
            conn.execute(sa.delete(delivery_statuses).where(delivery_statuses.c.tag == "race"))
        r.track("race", sent_at=NOW)
        result = polling.result(timeout=30)
    assert (result.ok, result.changed) == (True, 300)
    assert len(r.rows("race")) == 300
    # The poll that found the tag changed under it, then the full one: twice the pages.
    assert r.sim.request_count("race") == 3 * before


@pytest.mark.parametrize("state", ["completed", "expired"])
def test_a_tag_that_leaves_the_schedule_is_forgotten(rig: Callable[..., Rig], state: str) -> None:
    # Its numbers may be pruned from then on, which moves no marker.
    r = rig()
    if state == "expired":  # a window that closes before the poll, with numbers waiting
        r.track("gone", sent_at=NOW - timedelta(hours=47, minutes=59))
        answer = first_answer()
    else:
        r.track("gone", sent_at=NOW - timedelta(hours=2))
        answer = [item(f"+336{i:08d}", "Delivered", NOW) for i in range(300)]
    r.sim.set_items("gone", answer, page_size=100)
    r.clock.now += timedelta(minutes=5)
    assert r.poller.poll("gone").state == state
    with r.engine.begin() as conn:
        conn.execute(sa.delete(delivery_statuses).where(delivery_statuses.c.tag == "gone"))
    r.poller.poll("gone")  # by hand: `poll` polls a tag whatever its state
    assert len(r.rows("gone")) == 300
