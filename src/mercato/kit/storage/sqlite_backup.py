"""Embedded mode's backups: SQLite's online backup API into timestamped files, verified before use.

`sqlite3.Connection.backup` copies a live database page by page under SQLite's own locking, so the
shop keeps running while it copies, and the copy is a consistent snapshot (WAL included). There is
no point-in-time recovery here: PITR replays a write-ahead log archive, which is a PostgreSQL
feature (pgBackRest); an embedded backup restores to the moment it was taken.

A restore never touches the live file until the chosen backup passed `verify` (integrity check and
the schema's migration stamp present): it is copied next to the target and renamed over it in one
`os.replace`.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_NAME = re.compile(r"^mercato-(\d{8}T\d{6}\d{6}Z)\.db$")


class BackupError(RuntimeError):
    """A backup that cannot be made, found or trusted; the message says which and why."""


@dataclass(frozen=True)
class SqliteBackup:
    path: Path
    taken_at: datetime
    size_bytes: int


def create_backup(database: Path, folder: Path, *, now: datetime | None = None) -> SqliteBackup:
    if not database.exists():
        raise BackupError(f"no database at {database}")
    folder.mkdir(parents=True, exist_ok=True)
    taken_at = now or datetime.now(UTC)
    target = folder / f"mercato-{taken_at:%Y%m%dT%H%M%S%fZ}.db"
    partial = target.with_suffix(".partial")
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        dest = sqlite3.connect(partial)
        try:
            source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()
    os.replace(partial, target)
    verify_backup(target)
    return SqliteBackup(target, taken_at, target.stat().st_size)


def list_backups(folder: Path) -> list[SqliteBackup]:
    out = []
    for path in sorted(folder.glob("mercato-*.db")) if folder.exists() else []:
        match = _NAME.match(path.name)
        if match:
            taken = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
            out.append(SqliteBackup(path, taken, path.stat().st_size))
    return out


def verify_backup(path: Path) -> None:
    """Raise BackupError unless `path` is an intact SQLite database carrying a migration stamp."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchone()
            stamp = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path.name} is not a usable SQLite database: {exc}") from exc
    if result is None or result[0] != "ok":
        raise BackupError(f"{path.name} failed the integrity check: {result}")
    if stamp is None:
        raise BackupError(f"{path.name} has no migration stamp: not a Mercato database")


def restore_backup(backup: Path, database: Path) -> None:
    """Verify `backup`, then atomically put it in place of `database` (its -wal/-shm removed)."""
    verify_backup(backup)
    staged = database.with_name(database.name + ".restoring")
    shutil.copyfile(backup, staged)
    verify_backup(staged)
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
    os.replace(staged, database)


def pick(folder: Path, *, name: str | None = None, to_time: datetime | None = None) -> SqliteBackup:
    """The backup to restore: `name`, else the newest. A time is refused with the reason."""
    if to_time is not None:
        raise BackupError(
            "point-in-time recovery needs PostgreSQL's WAL archive (pgBackRest); an embedded "
            "backup restores to the moment it was taken: use --latest or --backup NAME"
        )
    backups = list_backups(folder)
    if not backups:
        raise BackupError(f"no backups in {folder}")
    if name is None:
        return backups[-1]
    found = next((b for b in backups if b.path.name == name), None)
    if found is None:
        raise BackupError(f"no backup named {name} in {folder}")
    return found
