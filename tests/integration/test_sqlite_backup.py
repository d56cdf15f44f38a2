"""Embedded mode's backup and restore through the CLI: an online backup of a live, migrated SQLite
database, restored after later writes (they are gone, the earlier ones back); a corrupt backup and a
point-in-time request are refused with a clear message and the live file left as it was."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.cli.main import app
from mercato.config import get_settings
from mercato.kit.storage.migrations import upgrade

runner = CliRunner()


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    database = tmp_path / "shop.db"
    monkeypatch.setenv("MERCATO_DATABASE_URL", f"sqlite+aiosqlite:///{database}")
    monkeypatch.setenv("MERCATO_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    upgrade(SCRIPT_LOCATION, f"sqlite+aiosqlite:///{database}")
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE drill (n INTEGER)")
        conn.executemany("INSERT INTO drill VALUES (?)", [(n,) for n in range(100)])
    yield database
    get_settings.cache_clear()


def _rows(database: Path) -> int:
    with sqlite3.connect(database) as conn:
        return int(conn.execute("SELECT count(*) FROM drill").fetchone()[0])


def test_backup_then_restore_latest_brings_back_exactly_the_backed_up_rows(embedded: Path) -> None:
    created = runner.invoke(app, ["backup", "create"])
    assert created.exit_code == 0, created.output
    with sqlite3.connect(embedded) as conn:  # written after the backup: lost by the restore
        conn.executemany("INSERT INTO drill VALUES (?)", [(n,) for n in range(100, 150)])
    assert _rows(embedded) == 150
    listed = runner.invoke(app, ["backup", "list"])
    assert "mercato-" in listed.output
    assert runner.invoke(app, ["backup", "verify"]).exit_code == 0
    restored = runner.invoke(app, ["restore", "--latest"])
    assert restored.exit_code == 0, restored.output
    assert _rows(embedded) == 100


def test_a_corrupt_backup_is_refused_and_nothing_is_overwritten(embedded: Path) -> None:
    assert runner.invoke(app, ["backup", "create"]).exit_code == 0
    [backup] = (embedded.parent / "backups").glob("mercato-*.db")
    data = bytearray(backup.read_bytes())
    data[:100] = b"\0" * 100  # the header gone: not a database any more
    backup.write_bytes(bytes(data))
    with sqlite3.connect(embedded) as conn:
        conn.execute("INSERT INTO drill VALUES (1000)")
    assert runner.invoke(app, ["backup", "verify"]).exit_code == 1
    refused = runner.invoke(app, ["restore", "--latest"])
    assert refused.exit_code == 1
    assert "nothing changed" in refused.output
    assert _rows(embedded) == 101


def test_point_in_time_is_refused_in_embedded_mode(embedded: Path) -> None:
    assert runner.invoke(app, ["backup", "create"]).exit_code == 0
    refused = runner.invoke(app, ["restore", "--to-time", "2026-01-01T00:00:00"])
    assert refused.exit_code == 1
    assert "PostgreSQL" in refused.output
    assert _rows(embedded) == 100
