"""Schema migrations: Alembic to head, run by ``db upgrade`` and by every command that
opens the database (unless ``SMSPARTNER_AUTO_MIGRATE=false``).

Alembic costs a quarter of a second to import, and almost every command finds the
schema already at head: the stored revision is read with one plain query and compared
with :data:`HEAD_REVISION`, and Alembic is imported only when they differ (a test keeps
the constant equal to the newest revision of ``migrations/versions``).

Several replicas may start at once on one PostgreSQL: the upgrade runs under a
transaction-scoped advisory lock, so one migrates and the others find the schema at head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from daemon.errors import SchemaOutOfDateError

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest revision in ``migrations/versions``: update it with every new revision
#: (tests/unit/test_migrate_head.py fails until it is).
HEAD_REVISION = "0003"

#: Arbitrary constant naming our advisory lock (``pg_advisory_xact_lock``).
_ADVISORY_LOCK_ID = 0x534D5350  # "SMSP"
#: Alembic's bookkeeping table (its default name).
_VERSION_TABLE = "alembic_version"


def alembic_config() -> Config:
    """Alembic's config pointing at the packaged migrations, wherever we are installed."""
    import sys
    from pathlib import Path

    from alembic.config import Config

    import migrations

    # Today's stdout, not the one Alembic bound as its default when first imported (a
    # stream replaced since, and maybe closed, as a test's captured output is).
    config = Config(stdout=sys.stdout)
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


def head_revision() -> str | None:
    """The newest revision the code knows (:data:`HEAD_REVISION`)."""
    return HEAD_REVISION


def script_head() -> str | None:
    """The newest revision as Alembic finds it in ``migrations/versions`` (imports it)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def stored_revision(conn: Connection) -> str | None:
    """The revision the database is at, read without Alembic (None when never migrated).

    A database with several revisions stored (branches, which we never create) answers
    with one of them, which is not :data:`HEAD_REVISION` alone; Alembic sorts it out.
    """
    if not sa.inspect(conn).has_table(_VERSION_TABLE):
        return None
    rows = conn.execute(sa.text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars().all()
    if len(rows) != 1:
        return None if not rows else "+".join(sorted(rows))
    return str(rows[0])


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None when it has never been migrated)."""
    with engine.connect() as conn:
        return stored_revision(conn)


def upgrade(engine: Engine) -> bool:
    """Migrate to head; return True when anything was applied."""
    if current_revision(engine) == HEAD_REVISION:
        return False
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
        if stored_revision(conn) == HEAD_REVISION:  # another replica migrated meanwhile
            return False
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        return True


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Migrate down (tests and rollbacks)."""
    from alembic import command

    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def ensure_schema(engine: Engine, *, auto_migrate: bool) -> None:
    """Bring the schema to head, or refuse clearly when auto-migration is off."""
    if auto_migrate:
        upgrade(engine)
        return
    current = current_revision(engine)
    if current != HEAD_REVISION:
        raise SchemaOutOfDateError(
            f"database schema is at {current or 'nothing'}, the code needs {HEAD_REVISION}: "
            "run `smspartner-status db upgrade` (SMSPARTNER_AUTO_MIGRATE is false)"
        )
