"""Migrations on both engines: up to head, the schema equals the models (`alembic check`),
down to base leaves nothing, and up again works."""

from __future__ import annotations

import ast
import re
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic import command

import migrations
from daemon import migrate
from daemon.db import (
    SUPPRESSION_LIST_SQL,
    TAG_SUMMARY_SQL,
    create_engine,
    delivery_statuses,
    metadata,
    tag_counts,
    tracked_tags,
)

VERSIONS = Path(migrations.__file__).parent / "versions"

TABLES = {
    "tracked_tags",
    "delivery_statuses",
    "delivery_status_events",
    "stop_sms_optouts",
    "poll_runs",
    "tag_counts",
    "account_optouts",
    "stop_list_syncs",
}
VIEWS = {"tag_summary", "suppression_list"}


def test_upgrade_check_downgrade_upgrade(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        assert migrate.upgrade(engine) is True
        assert migrate.current_revision(engine) == migrate.head_revision()
        inspector = sa.inspect(engine)
        assert set(inspector.get_table_names()) >= TABLES
        assert set(inspector.get_view_names()) >= VIEWS
        with engine.connect() as conn:  # `alembic check`: no difference from the models
            config = migrate.alembic_config()
            config.attributes["connection"] = conn
            command.check(config)
        assert migrate.upgrade(engine) is False  # idempotent

        migrate.downgrade(engine)
        inspector = sa.inspect(engine)
        assert not (TABLES | VIEWS) & set(inspector.get_table_names() + inspector.get_view_names())
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
        with engine.connect() as conn:
            view_columns = list(conn.execute(sa.text("SELECT * FROM suppression_list")).keys())
        assert view_columns == [
            "phone_number",
            "first_opted_out_at",
            "on_account_list",
            "stop_tags",
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
        "account_optouts": [
            "phone_number",
            "provider_id",
            "listed_at",
            "first_seen_at",
            "removed_at",
        ],
        "stop_list_syncs": [
            "id",
            "started_at",
            "finished_at",
            "outcome",
            "pages",
            "listed",
            "added",
            "removed",
            "error",
        ],
    }
    assert {name: [c.name for c in t.columns] for name, t in metadata.tables.items()} == expected


def test_upgrading_from_0001_counts_the_numbers_already_stored(db_url: str) -> None:
    """Revision 0002 moves tag_summary onto tag_counts: a database upgraded with data in
    it shows exactly what the counting view of 0001 showed, and so do a downgrade and
    a second upgrade."""
    engine = create_engine(db_url)
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    statuses = ["delivered", "delivered", "not_delivered", "failed", "waiting", "unknown"]
    try:
        with engine.begin() as conn:
            config = migrate.alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
        with engine.begin() as conn:
            conn.execute(
                sa.insert(tracked_tags),
                [
                    {"tag": tag, "sent_at": now, "window_ends_at": now + timedelta(2)}
                    for tag in ("spring", "summer", "empty")
                ],
            )
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
                query = sa.text("SELECT * FROM tag_summary ORDER BY tag")
                return [dict(r) for r in conn.execute(query).mappings()]

        before = summary()
        assert {r["tag"]: r["total"] for r in before} == {"spring": 6, "summer": 3, "empty": 0}
        started = datetime.now(UTC)
        migrate.upgrade(engine)
        assert summary() == before
        with engine.connect() as conn:  # counted "now", stored as the models store time
            stamps = conn.execute(sa.select(tag_counts.c.updated_at)).scalars().all()
            raw = conn.execute(sa.text("SELECT updated_at FROM tag_counts")).scalars().all()
        assert len(stamps) == 2
        assert all(started <= stamp <= datetime.now(UTC) for stamp in stamps)
        if engine.dialect.name == "sqlite":  # fixed width, so text order is time order
            assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", t) for t in raw)

        migrate.downgrade(engine, "0001")
        assert summary() == before
        migrate.upgrade(engine)
        assert summary() == before
    finally:
        engine.dispose()


def _foreign_names(path: Path) -> list[str]:
    """What ``path`` takes from outside alembic, sqlalchemy and the standard library:
    modules it imports, and any use of the name ``daemon`` (imported or not)."""
    allowed = {"alembic", "sqlalchemy", *sys.stdlib_module_names}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import (level > 0) reaches into our own package: never allowed.
            found.add("." if node.level else (node.module or "").split(".")[0])
        elif isinstance(node, ast.Name) and node.id == "daemon":
            found.add("daemon")
    return sorted(found - allowed)


def test_revisions_are_frozen() -> None:
    """A revision is history: it imports only alembic, sqlalchemy and the standard
    library, never the live models or SQL of ``daemon``, which later changes would
    otherwise rewrite under it."""
    revisions = [p for p in sorted(VERSIONS.glob("*.py")) if p.name != "__init__.py"]
    assert len(revisions) >= 2
    assert {p.name: _foreign_names(p) for p in revisions if _foreign_names(p)} == {}


def test_an_autogenerated_revision_is_frozen_too(tmp_path: Path) -> None:
    """``alembic revision --autogenerate`` writes the models' UTC type as plain
    ``sa.DateTime(timezone=True)``, and the revision it writes builds the models'
    schema: the next revision starts frozen."""
    scripts = tmp_path / "migrations"
    shutil.copytree(VERSIONS.parent, scripts, ignore=shutil.ignore_patterns("0*.py", "__pycache__"))
    config = migrate.alembic_config()
    config.set_main_option("script_location", str(scripts))
    engine = create_engine(f"sqlite:///{tmp_path / 'autogen.db'}")
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.revision(config, message="everything", autogenerate=True, rev_id="9999")
        (written,) = (scripts / "versions").glob("9999_*.py")
        assert _foreign_names(written) == []
        assert "sa.DateTime(timezone=True)" in written.read_text(encoding="utf-8")
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            command.check(config)  # the schema it built equals the models
    finally:
        engine.dispose()


def test_the_view_at_head_is_the_one_the_models_describe(tmp_path: Path) -> None:
    """The revisions carry their own copy of the view's SQL; ``daemon.db`` keeps the
    current one. Changing it there without a new revision fails here, instead of
    silently changing nothing."""
    engine = create_engine(f"sqlite:///{tmp_path / 'view.db'}")
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            created = conn.scalar(
                sa.text(
                    "SELECT sql FROM sqlite_master WHERE type = 'view' AND name = 'tag_summary'"
                )
            )
    finally:
        engine.dispose()
    assert created == f"CREATE VIEW tag_summary AS {TAG_SUMMARY_SQL}".rstrip()


def test_the_suppression_list_at_head_is_the_one_the_models_describe(tmp_path: Path) -> None:
    """As for ``tag_summary``: revision 0003 carries its own copy of the view's SQL."""
    engine = create_engine(f"sqlite:///{tmp_path / 'view.db'}")
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            created = conn.scalar(
                sa.text(
                    "SELECT sql FROM sqlite_master WHERE type = 'view' "
                    "AND name = 'suppression_list'"
                )
            )
    finally:
        engine.dispose()
    assert created == f"CREATE VIEW suppression_list AS {SUPPRESSION_LIST_SQL}".rstrip()
