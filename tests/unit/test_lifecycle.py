"""The lifecycle decision: what one poll's outcome does to its tag (design.md, "Tag
lifecycle"), as :func:`daemon.status.decide` rules it for the poller to write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from daemon.status import (
    Decision,
    Lifecycle,
    PollOutcome,
    TagNow,
    TagState,
    decide,
    parse_cadence,
)

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
ENDS = T0 + timedelta(hours=48)
LIFECYCLE = Lifecycle(
    cadence=parse_cadence("15m=1m,2h=5m,12h=15m,48h=1h"), settle=timedelta(minutes=10)
)
OK, API, TRANSIENT, AUTH = (
    PollOutcome.OK,
    PollOutcome.API_ERROR,
    PollOutcome.TRANSIENT_ERROR,
    PollOutcome.AUTH_ERROR,
)
ACTIVE, COMPLETED, EXPIRED, UNTRACKED = (
    TagState.ACTIVE,
    TagState.COMPLETED,
    TagState.EXPIRED,
    TagState.UNTRACKED,
)
FINAL_ONLY = {"delivered": 3, "not_delivered": 1}
SOME_WAITING = {"delivered": 3, "waiting": 2}
M, H = timedelta(minutes=1), timedelta(hours=1)

# (case, tag state, failures so far, outcome, counts, now,
#  expected: state, next poll (None: off the schedule), failures, expire pending, auth pause)
CASES = [
    ("ok, every number final: complete", ACTIVE, 0, OK, FINAL_ONLY, T0 + H,
     COMPLETED, None, 0, False, False),
    ("ok, final but not settled yet", ACTIVE, 0, OK, FINAL_ONLY, T0 + 5 * M,
     ACTIVE, T0 + 6 * M, 0, False, False),
    ("ok, some waiting: next on the cadence", ACTIVE, 0, OK, SOME_WAITING, T0 + H,
     ACTIVE, T0 + H + 5 * M, 0, False, False),
    ("ok, numbers we expired keep it from completing", COMPLETED, 0, OK,
     {"delivered": 3, "expired": 1}, T0 + 13 * H, ACTIVE, T0 + 14 * H, 0, False, False),
    ("ok resets the failures", ACTIVE, 4, OK, SOME_WAITING, T0 + H,
     ACTIVE, T0 + H + 5 * M, 0, False, False),
    ("the last poll is pinned to the window's end", ACTIVE, 0, OK, SOME_WAITING,
     ENDS - 10 * M, ACTIVE, ENDS, 0, False, False),
    ("a first failure: retried after 30 s", ACTIVE, 0, TRANSIENT, {}, T0 + H,
     ACTIVE, T0 + H + timedelta(seconds=30), 1, False, False),
    ("the backoff doubles", ACTIVE, 3, API, {}, T0 + H,
     ACTIVE, T0 + H + 4 * M, 4, False, False),
    ("the backoff is capped by the cadence", ACTIVE, 5, TRANSIENT, {}, T0 + H,
     ACTIVE, T0 + H + 5 * M, 6, False, False),
    ("a failure after the window: retried within the grace hour", ACTIVE, 2, TRANSIENT, {},
     ENDS + 10 * M, ACTIVE, ENDS + 12 * M, 3, False, False),
    ("a long backoff after the window stops at the grace hour's end", ACTIVE, 9, API, {},
     ENDS + 10 * M, ACTIVE, ENDS + H, 10, False, False),
    ("a failure after the grace hour: expired anyway", ACTIVE, 5, TRANSIENT, {},
     ENDS + H, EXPIRED, None, 6, True, False),
    ("ok after the window: expired, pending numbers too", ACTIVE, 0, OK, SOME_WAITING,
     ENDS + M, EXPIRED, None, 0, True, False),
    ("ok after the window, every number final: complete", ACTIVE, 0, OK, FINAL_ONLY,
     ENDS + M, COMPLETED, None, 0, True, False),
    ("code 4 early: keep polling", ACTIVE, 0, OK, {}, T0 + 2 * M,
     ACTIVE, T0 + 3 * M, 0, False, False),
    ("code 4 when the window closes: expired with no numbers", ACTIVE, 0, OK, {}, ENDS,
     EXPIRED, None, 0, True, False),
    ("auth error: paused five minutes", ACTIVE, 0, AUTH, {}, T0 + 2 * M,
     ACTIVE, T0 + 7 * M, 1, False, True),
    ("auth error after the window: paused, not capped by the grace", ACTIVE, 1, AUTH, {},
     ENDS + 58 * M, ACTIVE, ENDS + 63 * M, 2, False, True),
    ("auth error after the grace hour: expired", ACTIVE, 1, AUTH, {}, ENDS + 2 * H,
     EXPIRED, None, 2, True, True),
    ("untracked stays untracked after a poll", UNTRACKED, 0, OK, FINAL_ONLY, T0 + H,
     UNTRACKED, None, 0, False, False),
    ("untracked stays untracked after the window, nothing expired", UNTRACKED, 2, TRANSIENT,
     SOME_WAITING, ENDS + 2 * H, UNTRACKED, None, 3, False, False),
    ("a failed manual poll of a completed tag puts it back on the backoff", COMPLETED, 0,
     TRANSIENT, {}, T0 + H, ACTIVE, T0 + H + timedelta(seconds=30), 1, False, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "failures", "outcome", "counts", "now", "expected"),
    [pytest.param(*case[1:6], Decision(*case[6:]), id=case[0]) for case in CASES],
)
def test_a_polls_outcome_decides_its_tags_lifecycle(
    state: TagState,
    failures: int,
    outcome: PollOutcome,
    counts: dict[str, int],
    now: datetime,
    expected: Decision,
) -> None:
    tag = TagNow(state=state, sent_at=T0, window_ends_at=ENDS, consecutive_failures=failures)
    assert decide(tag, outcome, counts, now=now, lifecycle=LIFECYCLE) == expected


def test_the_states_and_outcomes_are_the_stored_words() -> None:
    assert [*TagState] == ["active", "completed", "expired", "untracked"]
    assert [*PollOutcome] == ["ok", "api_error", "transient_error", "auth_error"]
