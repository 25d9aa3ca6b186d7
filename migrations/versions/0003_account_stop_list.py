"""The account's STOP list: account_optouts, stop_list_syncs and the suppression_list view.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

``account_optouts`` mirrors ``GET /stop-sms/list`` (numbers are kept once they leave it,
with ``removed_at``); ``stop_list_syncs`` records every sync; ``suppression_list`` joins
it with ``stop_sms_optouts``: one row per number that opted out by any route.

Frozen history: the types, defaults and SQL below are copies of what the models were
when this revision was written, not imports of them, so a later change to ``daemon/db.py``
cannot change what this revision creates.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OUTCOMES = "outcome IN ('ok', 'api_error', 'transient_error', 'auth_error', 'truncated')"

# BIGINT on PostgreSQL; INTEGER on SQLite, where only "INTEGER PRIMARY KEY" is the rowid.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The models' UTC timestamp as DDL: "timestamp with time zone" on PostgreSQL, DATETIME on
# SQLite (where the daemon stores fixed-width ISO-8601 text ending in "Z").
UtcDateTime = sa.DateTime(timezone=True)

#: The view as this revision creates it.
SUPPRESSION_LIST_SQL = """
SELECT t.phone_number AS phone_number,
       MIN(t.moment) AS first_opted_out_at,
       EXISTS (SELECT 1 FROM account_optouts a
               WHERE a.phone_number = t.phone_number AND a.removed_at IS NULL) AS on_account_list,
       (SELECT COUNT(*) FROM stop_sms_optouts o
        WHERE o.phone_number = t.phone_number) AS stop_tags
FROM (SELECT phone_number, listed_at AS moment FROM account_optouts
      UNION ALL SELECT phone_number, first_seen_at FROM account_optouts
      UNION ALL SELECT phone_number, reported_at FROM stop_sms_optouts
      UNION ALL SELECT phone_number, first_seen_at FROM stop_sms_optouts) t
GROUP BY t.phone_number
"""


def upgrade() -> None:
    op.create_table(
        "account_optouts",
        sa.Column("phone_number", sa.String(64), nullable=False),
        sa.Column("provider_id", sa.BigInteger(), nullable=True),
        sa.Column("listed_at", UtcDateTime, nullable=True),
        sa.Column("first_seen_at", UtcDateTime, nullable=False),
        sa.Column("removed_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("phone_number", name=op.f("pk_account_optouts")),
    )
    op.create_table(
        "stop_list_syncs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("pages", sa.Integer(), server_default="0", nullable=False),
        sa.Column("listed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("added", sa.Integer(), server_default="0", nullable=False),
        sa.Column("removed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(_OUTCOMES, name=op.f("ck_stop_list_syncs_outcome")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stop_list_syncs")),
    )
    op.create_index(op.f("ix_stop_list_syncs_started_at"), "stop_list_syncs", ["started_at"])
    op.execute(f"CREATE VIEW suppression_list AS {SUPPRESSION_LIST_SQL}")


def downgrade() -> None:
    op.execute("DROP VIEW suppression_list")
    op.drop_index(op.f("ix_stop_list_syncs_started_at"), table_name="stop_list_syncs")
    op.drop_table("stop_list_syncs")
    op.drop_table("account_optouts")
