"""Migrations on both engines: up to head, the schema equals the models (`alembic check`),
down to base leaves nothing, and up again works."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import command

from daemon import migrate, store, tracking
from daemon.db import create_engine, delivery_statuses, metadata

TABLES = {
    "tracked_tags",
    "delivery_statuses",
    "delivery_status_events",
    "stop_sms_optouts",
    "poll_runs",
    "tag_counts",
}


def test_upgrade_check_downgrade_upgrade(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        assert migrate.upgrade(engine) is True
        assert migrate.current_revision(engine) == migrate.head_revision()
        inspector = sa.inspect(engine)
        assert set(inspector.get_table_names()) >= TABLES
        assert "tag_summary" in inspector.get_view_names()
        with engine.connect() as conn:  # `alembic check`: no difference from the models
            config = migrate.alembic_config()
            config.attributes["connection"] = conn
            command.check(config)
        assert migrate.upgrade(engine) is False  # idempotent

        migrate.downgrade(engine)
        inspector = sa.inspect(engine)
        assert not (TABLES | {"tag_summary"}) & set(
            inspector.get_table_names() + inspector.get_view_names()
        )
        assert migrate.current_revision(engine) is None

        migrate.upgrade(engine)
        with engine.connect() as conn:
            view_columns = list(conn.execute(sa.text("SELECT * FROM tag_summary")).keys())
        assert view_columns == [
            "tag",
            "sent_at",
            "window_ends_at",
            "state",
            "total",
            "waiting",
            "delivered",
            "not_delivered",
            "failed",
            "expired",
            "unknown",
            "stop_sms",
            "delivery_rate",
            "last_polled_at",
        ]
    finally:
        engine.dispose()


def test_models_name_every_contract_column() -> None:
    """The BI contract of design.md, column by column."""
    expected = {
        "tracked_tags": [
            "tag",
            "sent_at",
            "window_ends_at",
            "state",
            "next_poll_at",
            "last_polled_at",
            "last_success_at",
            "poll_count",
            "consecutive_failures",
            "last_error",
            "lease_owner",
            "lease_expires_at",
            "created_at",
            "updated_at",
        ],
        "delivery_statuses": [
            "id",
            "tag",
            "phone_number",
            "status",
            "provider_status",
            "stop_sms",
            "reported_at",
            "first_seen_at",
            "resolved_at",
            "updated_at",
        ],
        "delivery_status_events": [
            "id",
            "tag",
            "phone_number",
            "old_status",
            "new_status",
            "reported_at",
            "observed_at",
        ],
        "stop_sms_optouts": ["id", "phone_number", "tag", "reported_at", "first_seen_at"],
        "poll_runs": [
            "id",
            "tag",
            "started_at",
            "finished_at",
            "outcome",
            "pages",
            "numbers_seen",
            "numbers_changed",
            "error",
        ],
        "tag_counts": [
            "tag",
            "total",
            "waiting",
            "delivered",
            "not_delivered",
            "failed",
            "expired",
            "unknown",
            "stop_sms",
            "updated_at",
        ],
    }
    assert {name: [c.name for c in t.columns] for name, t in metadata.tables.items()} == expected


def test_upgrading_from_0001_counts_the_numbers_already_stored(db_url: str) -> None:
    """Revision 0002 moves tag_summary onto tag_counts: a database upgraded with data in
    it shows exactly what the counting view of 0001 showed, and so does a downgrade."""
    engine = create_engine(db_url)
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    statuses = ["delivered", "delivered", "not_delivered", "failed", "waiting", "unknown"]
    try:
        with engine.begin() as conn:
            config = migrate.alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
        with engine.begin() as conn:
            for tag in ("spring", "summer", "empty"):
                tracking.track(conn, tag, sent_at=now, window_ends_at=now + timedelta(2), now=now)
            conn.execute(
                sa.insert(delivery_statuses),
                [
                    {
                        "tag": tag,
                        "phone_number": f"+33{i}",
                        "status": status,
                        "stop_sms": i % 3 == 0,
                        "first_seen_at": now,
                        "updated_at": now,
                    }
                    for tag, count in (("spring", 6), ("summer", 3))
                    for i, status in enumerate(statuses[:count])
                ],
            )

        def summary() -> list[dict[str, object]]:
            with engine.connect() as conn:
                return [dict(r) for r in store.tag_summary(conn)]

        before = summary()
        assert {r["tag"]: r["total"] for r in before} == {"spring": 6, "summer": 3, "empty": 0}
        migrate.upgrade(engine)
        assert summary() == before
        migrate.downgrade(engine, "0001")
        assert summary() == before
    finally:
        engine.dispose()
