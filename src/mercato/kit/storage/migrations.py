"""Run Alembic migrations and compare the database's revision with the scripts' head."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from mercato.kit.storage.database import Database


def alembic_config(script_location: Path, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["url"] = url
    return cfg


def upgrade(script_location: Path, url: str, revision: str = "heads") -> None:
    """Apply migrations up to `revision` (every branch head by default).

    Synchronous: call it outside a running event loop.
    """
    command.upgrade(alembic_config(script_location, url), revision)


def downgrade(script_location: Path, url: str, revision: str) -> None:
    command.downgrade(alembic_config(script_location, url), revision)


def head_revisions(script_location: Path) -> frozenset[str]:
    """Every head of the migration graph (one per unmerged branch)."""
    script = ScriptDirectory.from_config(alembic_config(script_location, ""))
    return frozenset(script.get_heads())


async def current_revisions(db: Database) -> frozenset[str]:
    """The revisions the database is at; empty when it was never migrated."""
    try:
        async with db.read() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except DBAPIError:
        return frozenset()
    return frozenset(str(row[0]) for row in rows)
