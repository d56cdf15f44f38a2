"""Migrations apply from zero, match the tables the code declares, and roll back cleanly."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

import mercato.shop.cart.tables
import mercato.shop.identity.tables
import mercato.shop.inventory.tables
import mercato.shop.orders.tables  # noqa: F401 - registers the tables on the metadata
from mercato.bootstrap import SCRIPT_LOCATION
from mercato.kit.storage import create_database, metadata
from mercato.kit.storage.migrations import current_revisions, downgrade, head_revisions, upgrade


async def test_migrated_database_has_every_declared_table_and_column(database_url: str) -> None:
    db = create_database(database_url)
    try:
        assert await current_revisions(db) == head_revisions(SCRIPT_LOCATION)
        async with db.engine.connect() as conn:
            actual = await conn.run_sync(
                lambda sync: {
                    t: {c["name"] for c in inspect(sync).get_columns(t)}
                    for t in inspect(sync).get_table_names()
                }
            )
    finally:
        await db.dispose()
    for table in metadata.sorted_tables:
        assert table.name in actual, table.name
        assert {c.name for c in table.columns} == actual[table.name], table.name


@pytest.mark.parametrize("engine", ["sqlite"])
def test_downgrade_to_base_and_up_again(tmp_path: object, engine: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/m.db"
    upgrade(SCRIPT_LOCATION, url)
    downgrade(SCRIPT_LOCATION, url, "base")
    upgrade(SCRIPT_LOCATION, url)


def test_the_migrations_form_one_chain() -> None:
    # Branches merged side by side each chain a migration after the same parent; two heads would
    # still upgrade ("heads"), but the order of their steps would be Alembic's choice, not ours.
    assert len(head_revisions(SCRIPT_LOCATION)) == 1, head_revisions(SCRIPT_LOCATION)
