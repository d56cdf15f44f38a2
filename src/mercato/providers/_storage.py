"""Each simulator owns its database: its own MetaData, created at startup, never the shop's migrations.

A provider is another company's system; sharing the shop's schema or Alembic history would couple the
two in a way the real world never does.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import MetaData
from sqlalchemy.engine import make_url

from mercato.kit.storage import Database

__all__ = ["create_tables", "new_metadata"]

_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_metadata() -> MetaData:
    return MetaData(naming_convention=_NAMING)


async def create_tables(db: Database, metadata: MetaData) -> None:
    """Create missing tables (idempotent), making a SQLite file's directory first."""
    url = make_url(str(db.url))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
