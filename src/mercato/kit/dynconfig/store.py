"""The configuration store: validated, versioned, append-only documents in the database.

`put` validates the document with the caller's parser *before* writing it (an invalid document is
refused with the parser's message and nothing is stored); each accepted document gets the next version
number (the primary key makes two concurrent writers conflict instead of both winning); a rollback
writes the old document again as a new version, so history only grows and says who did what, when.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mercato.kit.clock import Clock
from mercato.kit.dynconfig.tables import runtime_config_versions, runtime_processes
from mercato.kit.storage import Database

__all__ = [
    "ConfigConflict",
    "ConfigInvalid",
    "ConfigStore",
    "ConfigVersion",
    "ProcessReport",
    "canonical",
]


class ConfigInvalid(ValueError):
    """The document breaks the schema; `errors` lists each problem as `path: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


class ConfigConflict(RuntimeError):
    """Another writer stored a version first (or the expected base version is no longer the latest)."""


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    version: int
    document: dict[str, Any]
    checksum: str
    author: str
    comment: str
    action: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ProcessReport:
    process_id: str
    role: str
    app_version: str
    config_version: int
    started_at: datetime
    seen_at: datetime
    needs: tuple[str, ...] = ()


def canonical(document: Mapping[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def _row(row: Any) -> ConfigVersion:
    return ConfigVersion(
        version=row.version,
        document=orjson.loads(row.document),
        checksum=row.checksum,
        author=row.author,
        comment=row.comment,
        action=row.action,
        created_at=row.created_at,
    )


class ConfigStore:
    """`validate(document)` raises `ConfigInvalid` (or any ValueError) for a document it refuses."""

    def __init__(self, db: Database, clock: Clock, *, validate: Callable[[dict[str, Any]], object]) -> None:
        self._db = db
        self._clock = clock
        self._validate = validate

    def check(self, document: dict[str, Any]) -> None:
        try:
            self._validate(document)
        except ConfigInvalid:
            raise
        except ValueError as exc:
            raise ConfigInvalid([str(exc)]) from exc

    async def latest(self) -> ConfigVersion | None:
        t = runtime_config_versions
        async with self._db.read() as conn:
            row = (await conn.execute(select(t).order_by(t.c.version.desc()).limit(1))).first()
        return None if row is None else _row(row)

    async def latest_version(self) -> int:
        t = runtime_config_versions
        async with self._db.read() as conn:
            value = (await conn.execute(select(func.max(t.c.version)))).scalar()
        return int(value or 0)

    async def get(self, version: int) -> ConfigVersion | None:
        t = runtime_config_versions
        async with self._db.read() as conn:
            row = (await conn.execute(select(t).where(t.c.version == version))).first()
        return None if row is None else _row(row)

    async def history(self, *, limit: int = 20) -> list[ConfigVersion]:
        t = runtime_config_versions
        async with self._db.read() as conn:
            rows = (await conn.execute(select(t).order_by(t.c.version.desc()).limit(limit))).all()
        return [_row(row) for row in rows]

    async def put(
        self,
        document: dict[str, Any],
        *,
        author: str,
        comment: str = "",
        action: str = "set",
        expected_version: int | None = None,
    ) -> ConfigVersion:
        """Validate, then store as the next version. `expected_version`: refuse unless it is the latest
        (compare-and-set for `mercato config set --base N`)."""
        self.check(document)
        body = canonical(document)
        t = runtime_config_versions
        try:
            async with self._db.write() as conn:
                current = int((await conn.execute(select(func.max(t.c.version)))).scalar() or 0)
                if expected_version is not None and current != expected_version:
                    raise ConfigConflict(f"latest version is {current}, not {expected_version}")
                stored = ConfigVersion(
                    version=current + 1,
                    document=orjson.loads(body),
                    checksum=hashlib.sha256(body).hexdigest(),
                    author=author[:200],
                    comment=comment[:500],
                    action=action,
                    created_at=self._clock.now(),
                )
                await conn.execute(
                    insert(t).values(
                        version=stored.version,
                        document=body.decode(),
                        checksum=stored.checksum,
                        author=stored.author,
                        comment=stored.comment,
                        action=stored.action,
                        created_at=stored.created_at,
                    )
                )
        except IntegrityError as exc:
            raise ConfigConflict("another version was stored concurrently; retry") from exc
        return stored

    async def rollback(self, *, to_version: int | None, author: str, comment: str = "") -> ConfigVersion:
        """Store an earlier document again as a new version (default: the one before the latest).
        Version 0 is the empty document: every setting back to its start-up value."""
        latest = await self.latest_version()
        target = latest - 1 if to_version is None else to_version
        if target < 0 or (target >= latest and latest > 0):
            raise ConfigInvalid([f"no earlier version {target} to roll back to (latest is {latest})"])
        document: dict[str, Any] = {}
        if target > 0:
            found = await self.get(target)
            if found is None:
                raise ConfigInvalid([f"version {target} does not exist"])
            document = found.document
        return await self.put(
            document, author=author, comment=comment or f"rollback to {target}", action="rollback"
        )

    # -- version reports ---------------------------------------------------------------------------

    async def report(self, report: ProcessReport) -> None:
        t = runtime_processes
        values = {
            "role": report.role,
            "app_version": report.app_version,
            "config_version": report.config_version,
            "needs": ",".join(report.needs),
            "started_at": report.started_at,
            "seen_at": report.seen_at,
        }
        async with self._db.write() as conn:
            result = await conn.execute(update(t).where(t.c.process_id == report.process_id).values(**values))
            if result.rowcount == 0:
                await conn.execute(insert(t).values(process_id=report.process_id, **values))

    async def forget(self, process_id: str) -> None:
        async with self._db.write() as conn:
            await conn.execute(delete(runtime_processes).where(runtime_processes.c.process_id == process_id))

    async def processes(self, *, seen_within_s: float) -> list[ProcessReport]:
        """Processes that reported within the window (a killed process drops out after it)."""
        t = runtime_processes
        since = self._clock.now() - timedelta(seconds=seen_within_s)
        async with self._db.read() as conn:
            rows = (await conn.execute(select(t).where(t.c.seen_at >= since).order_by(t.c.process_id))).all()
        return [
            ProcessReport(
                process_id=r.process_id,
                role=r.role,
                app_version=r.app_version,
                config_version=r.config_version,
                started_at=r.started_at,
                seen_at=r.seen_at,
                needs=tuple(filter(None, r.needs.split(","))),
            )
            for r in rows
        ]
