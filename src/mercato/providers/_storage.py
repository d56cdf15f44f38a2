"""Each simulator owns its database: its own MetaData, created at startup, never the shop's migrations.

A provider is another company's system; sharing the shop's schema or Alembic history would couple the
two in a way the real world never does.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Insert, MetaData, Table, bindparam, insert
from sqlalchemy.engine import make_url

from mercato.kit.storage import Database, create_database
from mercato.kit.storage.inline_sqlite import InlineSqliteDatabase, SqlDatabase
from mercato.kit.storage.statements import driver_prepared

__all__ = ["create_tables", "new_metadata", "provider_database", "row_insert"]

_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_metadata() -> MetaData:
    return MetaData(naming_convention=_NAMING)


def row_insert(table: Table) -> Insert:
    """`table`'s INSERT of one whole row, every column a parameter named after it: registered for
    the driver path, so on the inline SQLite database it skips SQLAlchemy's execution (ADR 0088)."""
    return driver_prepared(insert(table).values({c.name: bindparam(c.name, type_=c.type) for c in table.c}))


def provider_database(url: str) -> SqlDatabase:
    """A simulator's own database: SQLite inline on the loop's thread (one process owns the file,
    and aiosqlite's thread hops were most of a provider request's CPU), anything else async."""
    if make_url(url).get_backend_name() == "sqlite":
        return InlineSqliteDatabase(url)
    return create_database(url)


async def create_tables(db: SqlDatabase, metadata: MetaData) -> None:
    """Create missing tables (idempotent), making a SQLite file's directory first."""
    if isinstance(db, InlineSqliteDatabase):
        async with db.write() as conn:
            metadata.create_all(conn.sync_connection)
        return
    assert isinstance(db, Database)
    url = make_url(str(db.url))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
