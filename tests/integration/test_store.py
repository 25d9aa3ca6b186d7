"""The store's statements on both engines: forward-only upserts, events, opt-outs,
expiry and tag tracking, checked through the rows a BI user would read."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from daemon import migrate, queries, store, tracking
from daemon.db import create_engine, delivery_status_events, delivery_statuses, stop_sms_optouts
from daemon.status import Report, Status

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url)
    migrate.upgrade(eng)
    with eng.begin() as conn:
        tracking.track(conn, "spring", sent_at=T0, window_ends_at=T0 + timedelta(hours=48), now=T0)
    yield eng
    eng.dispose()


def rep(
    phone: str, status: Status, at: int | None = None, stop: bool = False, raw: str | None = None
) -> Report:
    reported = T0 + timedelta(minutes=at) if at is not None else None
    return Report(phone, status, raw or status.value, stop, reported)


def apply(engine: Engine, *reports: Report, minute: int = 1) -> store.Applied:
    with engine.begin() as conn:
        return store.apply_reports(
            conn,
            "spring",
            {r.phone_number: r for r in reports},
            now=T0 + timedelta(minutes=minute),
        )


def stored(engine: Engine) -> dict[str, tuple[str, bool, datetime | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                delivery_statuses.c.phone_number,
                delivery_statuses.c.status,
                delivery_statuses.c.stop_sms,
                delivery_statuses.c.reported_at,
            )
        )
        return {p: (s, bool(stop), r) for p, s, stop, r in rows}


def events(engine: Engine) -> list[tuple[str, str | None, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                delivery_status_events.c.phone_number,
                delivery_status_events.c.old_status,
                delivery_status_events.c.new_status,
            ).order_by(delivery_status_events.c.id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_waiting_then_delivered_is_applied_with_one_event_each(engine: Engine) -> None:
    apply(engine, rep("+1", Status.WAITING, 0))
    apply(engine, rep("+1", Status.DELIVERED, 5), minute=6)
    assert stored(engine)["+1"][0] == "delivered"
    assert events(engine) == [("+1", None, "waiting"), ("+1", "waiting", "delivered")]


def test_final_status_never_regresses_to_waiting_or_unknown(engine: Engine) -> None:
    apply(engine, rep("+1", Status.DELIVERED, 5))
    result = apply(engine, rep("+1", Status.WAITING, 9), minute=10)
    apply(engine, rep("+1", Status.UNKNOWN, 9, raw="Sent"), minute=11)
    assert result.changed == 0
    assert stored(engine)["+1"] == ("delivered", False, T0 + timedelta(minutes=5))
    assert len(events(engine)) == 1


def test_older_final_report_never_replaces_a_newer_one(engine: Engine) -> None:
    apply(engine, rep("+1", Status.NOT_DELIVERED, 30))
    apply(engine, rep("+1", Status.DELIVERED, 20), minute=40)  # older
    apply(engine, rep("+1", Status.DELIVERED, None), minute=41)  # undated
    apply(engine, rep("+1", Status.DELIVERED, 30), minute=42)  # same date: keep stored
    assert stored(engine)["+1"][0] == "not_delivered"
    apply(engine, rep("+1", Status.DELIVERED, 50), minute=60)  # strictly later wins
    assert stored(engine)["+1"][0] == "delivered"
    assert [e[2] for e in events(engine)] == ["not_delivered", "delivered"]


def test_unchanged_repoll_writes_nothing(engine: Engine) -> None:
    batch = [rep(f"+{i}", Status.DELIVERED if i % 2 else Status.WAITING, 1) for i in range(50)]
    first = apply(engine, *batch)
    again = apply(engine, *batch, minute=5)
    assert (first.changed, first.events) == (50, 50)
    assert (again.changed, again.events) == (0, 0)
    with engine.connect() as conn:
        touched = conn.scalar(
            sa.select(sa.func.count()).where(
                delivery_statuses.c.updated_at > T0 + timedelta(minutes=1)
            )
        )
    assert touched == 0


def test_hundreds_of_changes_in_one_poll_are_all_written(engine: Engine) -> None:
    """250 numbers are more than one statement's worth of rows (SQLite sends 100 to a
    statement): every row and event arrives, and the poll's figures match them."""
    first = apply(engine, *(rep(f"+{i}", Status.WAITING, 0, stop=i % 50 == 0) for i in range(250)))
    later = [rep(f"+{i}", Status.DELIVERED if i % 5 else Status.FAILED, 7) for i in range(260)]
    second = apply(engine, *later, minute=8)  # and 10 numbers seen for the first time
    assert (first.changed, first.events, len(first.optouts), first.stop_sms) == (250, 250, 5, 5)
    assert first.counts == {"waiting": 250}
    assert (second.changed, second.events, second.stop_sms) == (260, 260, 5)
    assert second.counts == {"delivered": 208, "failed": 52}
    assert len(second.newly_final) == 260
    rows = stored(engine)
    assert len(rows) == 260
    assert events(engine).count(("+255", None, "failed")) == 1
    assert rows["+7"] == ("delivered", False, T0 + timedelta(minutes=7))
    assert rows["+50"] == ("failed", True, T0 + timedelta(minutes=7))
    changes = [e for e in events(engine) if e[1] is not None]
    assert len(changes) == 250
    assert changes.count(("+10", "waiting", "failed")) == 1


def test_stop_sms_is_sticky_and_opts_out_once(engine: Engine) -> None:
    apply(engine, rep("+1", Status.DELIVERED, 1, stop=True))
    second = apply(engine, rep("+1", Status.DELIVERED, 1, stop=False), minute=2)
    assert stored(engine)["+1"][1] is True
    assert second.changed == 0
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(stop_sms_optouts)) == 1


def test_stop_sms_arriving_later_changes_the_row_but_writes_no_status_event(
    engine: Engine,
) -> None:
    apply(engine, rep("+1", Status.DELIVERED, 1))
    result = apply(engine, rep("+1", Status.DELIVERED, 1, stop=True), minute=3)
    assert (result.changed, result.events, len(result.optouts)) == (1, 0, 1)
    assert stored(engine)["+1"][1] is True


def test_expired_is_replaced_by_a_late_provider_report(engine: Engine) -> None:
    apply(engine, rep("+1", Status.WAITING, 0), rep("+2", Status.DELIVERED, 1))
    with engine.begin() as conn:
        assert store.expire_pending(conn, "spring", now=T0 + timedelta(hours=48)) == 1
    assert stored(engine)["+1"][0] == "expired"
    apply(engine, rep("+1", Status.WAITING, 0), minute=60 * 49)
    assert stored(engine)["+1"][0] == "expired"
    apply(engine, rep("+1", Status.DELIVERED, 60 * 47), minute=60 * 49)
    assert stored(engine)["+1"][0] == "delivered"
    assert [e[1:] for e in events(engine) if e[0] == "+1"] == [
        (None, "waiting"),
        ("waiting", "expired"),
        ("expired", "delivered"),
    ]


def test_sql_rule_matches_the_pure_rule_for_every_pair(engine: Engine) -> None:
    """The upsert's WHERE and status.supersedes agree on every combination."""
    from daemon.status import supersedes

    variants = [
        rep("+x", s, at, stop) for s in Status for at in (None, 10, 20) for stop in (False, True)
    ]
    olds, news = {}, []
    for i, (old, new) in enumerate((o, n) for o in variants for n in variants):
        phone = f"+{i}"
        olds[phone] = Report(phone, old.status, old.provider_status, old.stop_sms, old.reported_at)
        news.append(Report(phone, new.status, new.provider_status, new.stop_sms, new.reported_at))
    with engine.begin() as conn:
        store.apply_reports(conn, "spring", olds, now=T0)
        # Bypass the Python pre-filter: send every row straight to the statement.
        stmt = store._upsert_statuses(conn).returning(delivery_statuses.c.phone_number)
        changed = [
            row
            for n in news
            for row in conn.execute(
                stmt,
                {
                    "tag": "spring",
                    "phone_number": n.phone_number,
                    "status": n.status.value,
                    "provider_status": n.provider_status,
                    "stop_sms": n.stop_sms,
                    "reported_at": n.reported_at,
                    "first_seen_at": T0,
                    "resolved_at": None,
                    "updated_at": T0,
                },
            )
        ]
    changed_phones = {row[0] for row in changed}
    expected = {n.phone_number for n in news if supersedes(n, olds[n.phone_number])}
    assert len(news) == 36 * 36
    assert changed_phones == expected


def test_track_again_reopens_and_only_moves_the_window_later(engine: Engine) -> None:
    later = T0 + timedelta(days=3)
    with engine.begin() as conn:
        tracking.untrack(conn, "spring", now=T0)
        tracking.track(
            conn,
            "spring",
            sent_at=T0 - timedelta(days=1),
            window_ends_at=T0 + timedelta(hours=24),
            now=T0,
        )
        row = tracking.get_tag(conn, "spring")
        assert row is not None
        assert (row["state"], row["sent_at"]) == ("active", T0)
        tracking.track(
            conn, "spring", sent_at=later, window_ends_at=later + timedelta(hours=48), now=later
        )
        row = tracking.get_tag(conn, "spring")
        assert row is not None
        assert (row["sent_at"], row["window_ends_at"]) == (later, later + timedelta(hours=48))


def test_tag_summary_counts_and_rate(engine: Engine) -> None:
    apply(
        engine,
        rep("+1", Status.DELIVERED, 1, stop=True),
        rep("+2", Status.DELIVERED, 1),
        rep("+3", Status.NOT_DELIVERED, 1),
        rep("+4", Status.WAITING, 0),
        rep("+5", Status.UNKNOWN, 0, raw="Sent"),
        rep("+6", Status.FAILED, 1),
    )
    with engine.begin() as conn:
        tracking.track(conn, "empty", sent_at=T0, window_ends_at=T0 + timedelta(hours=48), now=T0)
        rows = {r["tag"]: dict(r) for r in queries.tag_summary(conn)}
    spring = rows["spring"]
    assert (
        spring["total"],
        spring["delivered"],
        spring["not_delivered"],
        spring["failed"],
        spring["waiting"],
        spring["unknown"],
        spring["stop_sms"],
    ) == (6, 2, 1, 1, 1, 1, 1)
    assert spring["delivery_rate"] == pytest.approx(2 / 6)
    assert spring["sent_at"] == T0
    assert rows["empty"]["total"] == 0 and rows["empty"]["delivery_rate"] is None
