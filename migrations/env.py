"""Alembic environment: runs migrations on the connection the daemon hands over, or on
``SMSPARTNER_DATABASE_URL`` when ``alembic`` is run by hand."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context

from daemon.db import UtcDateTime, create_engine, metadata

config = context.config


def _include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # The views are created by raw SQL; autogenerate must not mistake them for tables.
    return not (type_ == "table" and name in ("tag_summary", "suppression_list"))


def _render_item(type_: str, obj: object, autogen_context: Any) -> str | Literal[False]:
    # Revisions are frozen history and import nothing of ours: autogenerate writes our
    # UTC type as the plain type its DDL is (on SQLite too: DATETIME).
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_online() -> None:
    """Migrate on the given connection, or one made from the settings."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from daemon.settings import load_settings

    engine = create_engine(load_settings().database_url.get_secret_value())
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        include_object=_include_object,
        render_item=_render_item,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
