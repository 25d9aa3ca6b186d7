"""Per-tag counts kept by the poller; tag_summary reads them instead of counting numbers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The view keeps its columns and types. Existing data is counted once here; from then on
each poll writes its tag's counts in the transaction that changes its numbers.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from daemon.db import (
    TAG_COUNTS_FROM_STATUSES_SQL,
    TAG_SUMMARY_SQL,
    TAG_SUMMARY_SQL_0001,
    UtcDateTime,
    utcnow,
)

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = ("total", "waiting", "delivered", "not_delivered", "failed", "expired", "unknown")


def upgrade() -> None:
    op.create_table(
        "tag_counts",
        sa.Column("tag", sa.String(64), nullable=False),
        *(
            sa.Column(name, sa.Integer(), server_default="0", nullable=False)
            for name in (*_COUNTS, "stop_sms")
        ),
        sa.Column("updated_at", UtcDateTime(), server_default=utcnow(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tag"], ["tracked_tags.tag"], name=op.f("fk_tag_counts_tag_tracked_tags")
        ),
        sa.PrimaryKeyConstraint("tag", name=op.f("pk_tag_counts")),
    )
    op.create_index(op.f("ix_tracked_tags_sent_at"), "tracked_tags", ["sent_at"])
    now = sa.bindparam("now", datetime.now(UTC), type_=UtcDateTime())
    op.execute(sa.text(TAG_COUNTS_FROM_STATUSES_SQL).bindparams(now))
    op.execute("DROP VIEW tag_summary")
    op.execute(f"CREATE VIEW tag_summary AS {TAG_SUMMARY_SQL}")


def downgrade() -> None:
    op.execute("DROP VIEW tag_summary")
    op.execute(f"CREATE VIEW tag_summary AS {TAG_SUMMARY_SQL_0001}")
    op.drop_index(op.f("ix_tracked_tags_sent_at"), table_name="tracked_tags")
    op.drop_table("tag_counts")
