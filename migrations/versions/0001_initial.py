"""Initial schema: tags, statuses, events, opt-outs, poll runs and the tag_summary view.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Frozen history: the types, defaults and SQL below are copies of what the models were
when this revision was written, not imports of them, so a later change to ``daemon/db.py``
cannot change what this revision creates.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATES = "state IN ('active', 'completed', 'expired', 'untracked')"
_STATUSES = "status IN ('delivered', 'not_delivered', 'failed', 'waiting', 'unknown', 'expired')"
_OUTCOMES = "outcome IN ('ok', 'api_error', 'transient_error', 'auth_error')"

# BIGINT on PostgreSQL; INTEGER on SQLite, where only "INTEGER PRIMARY KEY" is the rowid.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The models' UTC timestamp as DDL: "timestamp with time zone" on PostgreSQL, DATETIME on
# SQLite (where the daemon stores fixed-width ISO-8601 text ending in "Z").
UtcDateTime = sa.DateTime(timezone=True)


def utcnow() -> sa.TextClause:
    """The server default "now, in UTC", in each engine's column format."""
    if op.get_bind().dialect.name == "sqlite":
        return sa.text("(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))")
    return sa.text("CURRENT_TIMESTAMP")


#: The BI view as this revision creates it: it counts ``delivery_statuses`` on every read.
TAG_SUMMARY_SQL = """
SELECT t.tag AS tag, t.sent_at AS sent_at, t.window_ends_at AS window_ends_at,
       t.state AS state,
       COUNT(d.id) AS total,
       SUM(CASE WHEN d.status = 'waiting' THEN 1 ELSE 0 END) AS waiting,
       SUM(CASE WHEN d.status = 'delivered' THEN 1 ELSE 0 END) AS delivered,
       SUM(CASE WHEN d.status = 'not_delivered' THEN 1 ELSE 0 END) AS not_delivered,
       SUM(CASE WHEN d.status = 'failed' THEN 1 ELSE 0 END) AS failed,
       SUM(CASE WHEN d.status = 'expired' THEN 1 ELSE 0 END) AS expired,
       SUM(CASE WHEN d.status = 'unknown' THEN 1 ELSE 0 END) AS unknown,
       SUM(CASE WHEN d.stop_sms THEN 1 ELSE 0 END) AS stop_sms,
       CASE WHEN COUNT(d.id) = 0 THEN NULL
            ELSE CAST(SUM(CASE WHEN d.status = 'delivered' THEN 1 ELSE 0 END) AS DOUBLE PRECISION) / COUNT(d.id)
       END AS delivery_rate,
       t.last_polled_at AS last_polled_at
FROM tracked_tags t
LEFT JOIN delivery_statuses d ON d.tag = t.tag
GROUP BY t.tag, t.sent_at, t.window_ends_at, t.state, t.last_polled_at
"""  # noqa: E501 (the text as the view was first created, byte for byte)


def upgrade() -> None:
    op.create_table(
        "tracked_tags",
        sa.Column("tag", sa.String(64), nullable=False),
        sa.Column("sent_at", UtcDateTime, server_default=utcnow(), nullable=False),
        sa.Column("window_ends_at", UtcDateTime, nullable=True),
        sa.Column("state", sa.String(16), server_default="active", nullable=False),
        sa.Column("next_poll_at", UtcDateTime, nullable=True),
        sa.Column("last_polled_at", UtcDateTime, nullable=True),
        sa.Column("last_success_at", UtcDateTime, nullable=True),
        sa.Column("poll_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", UtcDateTime, nullable=True),
        sa.Column("created_at", UtcDateTime, server_default=utcnow(), nullable=False),
        sa.Column("updated_at", UtcDateTime, server_default=utcnow(), nullable=False),
        sa.CheckConstraint(_STATES, name=op.f("ck_tracked_tags_state")),
        sa.PrimaryKeyConstraint("tag", name=op.f("pk_tracked_tags")),
    )
    op.create_index(
        op.f("ix_tracked_tags_state_next_poll_at"), "tracked_tags", ["state", "next_poll_at"]
    )

    op.create_table(
        "delivery_statuses",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.Column("phone_number", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("provider_status", sa.Text(), nullable=True),
        sa.Column("stop_sms", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("reported_at", UtcDateTime, nullable=True),
        sa.Column("first_seen_at", UtcDateTime, nullable=False),
        sa.Column("resolved_at", UtcDateTime, nullable=True),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.CheckConstraint(_STATUSES, name=op.f("ck_delivery_statuses_status")),
        sa.ForeignKeyConstraint(
            ["tag"],
            ["tracked_tags.tag"],
            name=op.f("fk_delivery_statuses_tag_tracked_tags"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_statuses")),
        sa.UniqueConstraint(
            "tag", "phone_number", name=op.f("uq_delivery_statuses_tag_phone_number")
        ),
    )
    op.create_index(op.f("ix_delivery_statuses_status"), "delivery_statuses", ["status"])
    op.create_index(op.f("ix_delivery_statuses_tag_status"), "delivery_statuses", ["tag", "status"])

    op.create_table(
        "delivery_status_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.Column("phone_number", sa.String(64), nullable=False),
        sa.Column("old_status", sa.String(16), nullable=True),
        sa.Column("new_status", sa.String(16), nullable=False),
        sa.Column("reported_at", UtcDateTime, nullable=True),
        sa.Column("observed_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_status_events")),
    )
    op.create_index(
        op.f("ix_delivery_status_events_tag_phone_number"),
        "delivery_status_events",
        ["tag", "phone_number"],
    )
    op.create_index(
        op.f("ix_delivery_status_events_observed_at"), "delivery_status_events", ["observed_at"]
    )

    op.create_table(
        "stop_sms_optouts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("phone_number", sa.String(64), nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.Column("reported_at", UtcDateTime, nullable=True),
        sa.Column("first_seen_at", UtcDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stop_sms_optouts")),
        sa.UniqueConstraint(
            "phone_number", "tag", name=op.f("uq_stop_sms_optouts_phone_number_tag")
        ),
    )

    op.create_table(
        "poll_runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("pages", sa.Integer(), server_default="0", nullable=False),
        sa.Column("numbers_seen", sa.Integer(), server_default="0", nullable=False),
        sa.Column("numbers_changed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(_OUTCOMES, name=op.f("ck_poll_runs_outcome")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_poll_runs")),
    )
    op.create_index(op.f("ix_poll_runs_tag_started_at"), "poll_runs", ["tag", "started_at"])

    op.execute(f"CREATE VIEW tag_summary AS {TAG_SUMMARY_SQL}")


def downgrade() -> None:
    op.execute("DROP VIEW tag_summary")
    op.drop_table("poll_runs")
    op.drop_table("stop_sms_optouts")
    op.drop_table("delivery_status_events")
    op.drop_table("delivery_statuses")
    op.drop_table("tracked_tags")
