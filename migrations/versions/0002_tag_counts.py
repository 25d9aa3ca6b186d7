"""Per-tag counts kept by the poller; tag_summary reads them instead of counting numbers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The view keeps its columns and types. Existing data is counted once here; from then on
each poll writes its tag's counts in the transaction that changes its numbers.

Frozen history: the types, defaults and SQL below are copies of what the models were
when this revision was written, not imports of them, so a later change to ``daemon/db.py``
cannot change what this revision creates.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = ("total", "waiting", "delivered", "not_delivered", "failed", "expired", "unknown")

#: The view as this revision creates it: one row of ``tag_counts`` per tag.
TAG_SUMMARY_SQL = """
SELECT t.tag AS tag, t.sent_at AS sent_at, t.window_ends_at AS window_ends_at,
       t.state AS state,
       CAST(COALESCE(c.total, 0) AS BIGINT) AS total, CAST(COALESCE(c.waiting, 0) AS BIGINT) AS waiting, CAST(COALESCE(c.delivered, 0) AS BIGINT) AS delivered, CAST(COALESCE(c.not_delivered, 0) AS BIGINT) AS not_delivered, CAST(COALESCE(c.failed, 0) AS BIGINT) AS failed, CAST(COALESCE(c.expired, 0) AS BIGINT) AS expired, CAST(COALESCE(c.unknown, 0) AS BIGINT) AS unknown, CAST(COALESCE(c.stop_sms, 0) AS BIGINT) AS stop_sms,
       CASE WHEN COALESCE(c.total, 0) = 0 THEN NULL
            ELSE CAST(c.delivered AS DOUBLE PRECISION) / c.total
       END AS delivery_rate,
       t.last_polled_at AS last_polled_at
FROM tracked_tags t
LEFT JOIN tag_counts c ON c.tag = t.tag
"""  # noqa: E501 (the text as the view was first created, byte for byte)

#: The view as revision 0001 created it, for the downgrade.
TAG_SUMMARY_SQL_0001 = """
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

#: Count every tag's numbers once, into the new, empty ``tag_counts``.
_COUNT_EXISTING_SQL = """
INSERT INTO tag_counts (tag, total, waiting, delivered, not_delivered, failed, expired, unknown, stop_sms, updated_at)
SELECT d.tag, COUNT(*), SUM(CASE WHEN d.status = 'waiting' THEN 1 ELSE 0 END), SUM(CASE WHEN d.status = 'delivered' THEN 1 ELSE 0 END), SUM(CASE WHEN d.status = 'not_delivered' THEN 1 ELSE 0 END), SUM(CASE WHEN d.status = 'failed' THEN 1 ELSE 0 END), SUM(CASE WHEN d.status = 'expired' THEN 1 ELSE 0 END), SUM(CASE WHEN d.status = 'unknown' THEN 1 ELSE 0 END),
       SUM(CASE WHEN d.stop_sms THEN 1 ELSE 0 END), :now
FROM delivery_statuses d
GROUP BY d.tag
"""  # noqa: E501 (as first written)


def _now(dialect: str) -> datetime | str:
    """The current time as the models bind it: SQLite keeps fixed-width ISO-8601 text
    with microseconds and ``Z`` (text order is time order), PostgreSQL a timestamptz."""
    now = datetime.now(UTC)
    if dialect == "sqlite":
        return now.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return now


def _utcnow(dialect: str) -> sa.TextClause:
    """The server default "now, in UTC", in each engine's column format."""
    if dialect == "sqlite":
        return sa.text("(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))")
    return sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "tag_counts",
        sa.Column("tag", sa.String(64), nullable=False),
        *(
            sa.Column(name, sa.Integer(), server_default="0", nullable=False)
            for name in (*_COUNTS, "stop_sms")
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=_utcnow(dialect),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["tag"], ["tracked_tags.tag"], name=op.f("fk_tag_counts_tag_tracked_tags")
        ),
        sa.PrimaryKeyConstraint("tag", name=op.f("pk_tag_counts")),
    )
    op.create_index(op.f("ix_tracked_tags_sent_at"), "tracked_tags", ["sent_at"])
    op.execute(sa.text(_COUNT_EXISTING_SQL).bindparams(now=_now(dialect)))
    op.execute("DROP VIEW tag_summary")
    op.execute(f"CREATE VIEW tag_summary AS {TAG_SUMMARY_SQL}")


def downgrade() -> None:
    op.execute("DROP VIEW tag_summary")
    op.execute(f"CREATE VIEW tag_summary AS {TAG_SUMMARY_SQL_0001}")
    op.drop_index(op.f("ix_tracked_tags_sent_at"), table_name="tracked_tags")
    op.drop_table("tag_counts")
