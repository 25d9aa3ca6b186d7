"""Schema migrations: Alembic to head, run by ``db upgrade`` and by every command that
opens the database (unless ``SMSPARTNER_AUTO_MIGRATE=false``).

Several replicas may start at once on one PostgreSQL: the upgrade runs under a
transaction-scoped advisory lock, so one migrates and the others find the schema at head.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

import migrations
from daemon.errors import SchemaOutOfDateError

#: Arbitrary constant naming our advisory lock (``pg_advisory_xact_lock``).
_ADVISORY_LOCK_ID = 0x534D5350  # "SMSP"


def alembic_config() -> Config:
    """Alembic's config pointing at the packaged migrations, wherever we are installed."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


def head_revision() -> str | None:
    """The newest revision the code knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None when it has never been migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> bool:
    """Migrate to head; return True when anything was applied."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
        before = MigrationContext.configure(conn).get_current_revision()
        if before == head_revision():
            return False
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        return True


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Migrate down (tests and rollbacks)."""
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def ensure_schema(engine: Engine, *, auto_migrate: bool) -> None:
    """Bring the schema to head, or refuse clearly when auto-migration is off."""
    if auto_migrate:
        upgrade(engine)
        return
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutOfDateError(
            f"database schema is at {current or 'nothing'}, the code needs {head}: "
            "run `smspartner-status db upgrade` (SMSPARTNER_AUTO_MIGRATE is false)"
        )
