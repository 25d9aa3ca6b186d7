"""The bound on what the poller remembers of tags' answers."""

from __future__ import annotations

from datetime import UTC, datetime

from daemon.answers import Answer, Answers
from daemon.status import Report, Status
from daemon.store import Tally

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def answer(numbers: int) -> Answer:
    phones = [f"+336{i:08d}" for i in range(numbers)]
    return Answer(
        (1, NOW),
        {phone: Report(phone, Status.DELIVERED, "Delivered", False, NOW) for phone in phones},
        Tally({"delivered": numbers}, 0),
    )


def test_small_tags_are_not_remembered() -> None:
    answers = Answers(min_numbers=100, max_numbers=1_000)
    answers.remember("small", answer(99))
    answers.remember("large", answer(100))
    assert answers.get("small") is None
    assert answers.get("large") is not None


def test_the_least_recently_polled_tags_make_room_for_a_new_one() -> None:
    answers = Answers(min_numbers=1, max_numbers=1_000)
    for tag in ("a", "b", "c"):
        answers.remember(tag, answer(400))
    assert [t for t in "abc" if answers.get(t)] == ["b", "c"]
    answers.remember("b", answer(400))  # polled again: now the most recent
    answers.remember("d", answer(400))
    assert [t for t in "abcd" if answers.get(t)] == ["b", "d"]
    answers.remember("huge", answer(1_001))  # more than the bound: never kept
    assert answers.get("huge") is None and answers.get("d") is not None


def test_a_forgotten_tag_frees_its_numbers() -> None:
    answers = Answers(min_numbers=1, max_numbers=1_000)
    answers.remember("a", answer(600))
    answers.forget("a")
    answers.remember("b", answer(600))
    answers.remember("c", answer(400))
    assert answers.get("a") is None
    assert answers.get("b") is not None and answers.get("c") is not None
