"""What a SQLite commit survives is a setting the running system honours (ADR 0058).

NORMAL (the default) keeps commits across a process crash; FULL fsyncs the WAL at every commit so
they survive a power loss too. The shop's `Database` is built by `build_database` from the settings;
every connection of its pool, readers and writers, must run with the one chosen.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mercato.bootstrap import build_database
from mercato.config import DatabaseSettings, Settings
from mercato.kit.storage import create_database


@pytest.mark.parametrize(("setting", "level"), [(None, 1), ("NORMAL", 1), ("FULL", 2)])
async def test_the_shop_database_runs_with_the_configured_synchronous(
    tmp_path: Path, setting: str | None, level: int
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'durability.db'}"
    database = (
        DatabaseSettings(url=url)
        if setting is None
        else DatabaseSettings(url=url, sqlite_synchronous=setting)
    )
    db = build_database(Settings(database=database, data_dir=tmp_path))
    try:
        async with db.read() as conn:
            read_level = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
        async with db.write() as conn:
            write_level = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
            journal = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
    finally:
        await db.dispose()
    assert (read_level, write_level, journal) == (level, level, "wal")


def test_only_normal_and_full_are_accepted() -> None:
    # OFF would lose commits on an OS crash *and* risk the file; EXTRA buys nothing in WAL mode.
    with pytest.raises(ValidationError):
        DatabaseSettings(sqlite_synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        create_database("sqlite+aiosqlite:///:memory:", sqlite_synchronous="OFF")
