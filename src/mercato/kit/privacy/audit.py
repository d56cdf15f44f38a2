"""The audit log of staff actions: who used a staff power on what, and when (guide §12).

A row is written when a request is authorised with a staff scope, before the operation runs: a
staff read or change is never without its record (if the record cannot be written, the request
fails). The table is append-only in the database itself (triggers refuse UPDATE, and DELETE of a
row younger than the retention period), so neither a bug nor a compromised application account
can rewrite history; only the retention purge removes rows, once they are past it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.privacy.tables import audit_log
from mercato.kit.storage import Database

__all__ = ["AuditEntry", "AuditLog"]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: uuid.UUID
    at: datetime
    actor: str
    action: str
    resource: str
    subject_id: uuid.UUID | None
    scopes: str
    request_id: str | None


class AuditLog:
    def __init__(
        self, db: Database, clock: Clock, *, audited_scopes: frozenset[str], retention_days: int
    ) -> None:
        self._db = db
        self._clock = clock
        self._audited = audited_scopes
        self.retention = timedelta(days=retention_days)

    def wants(self, scopes: frozenset[str]) -> bool:
        """Whether an operation needing `scopes` is a staff action to record."""
        return bool(scopes & self._audited)

    async def record(
        self,
        *,
        actor: str,
        action: str,
        resource: str,
        scopes: frozenset[str],
        subject_id: uuid.UUID | None = None,
        request_id: str | None = None,
    ) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                insert(audit_log).values(
                    id=new_id(),
                    at=self._clock.now(),
                    actor=actor[:64],
                    action=action[:16],
                    resource=resource[:300],
                    subject_id=subject_id,
                    scopes=" ".join(sorted(scopes))[:200],
                    request_id=request_id[:64] if request_id else None,
                )
            )

    async def entries(
        self, *, actor: str | None = None, before: uuid.UUID | None = None, limit: int = 50
    ) -> list[AuditEntry]:
        """Newest first; `before` is the last id of the previous page."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if actor is not None:
            query = query.where(audit_log.c.actor == actor)
        if before is not None:
            query = query.where(audit_log.c.id < before)
        async with self._db.read() as conn:
            rows = await conn.execute(query)
            return [
                AuditEntry(
                    id=r.id,
                    at=r.at,
                    actor=r.actor,
                    action=r.action,
                    resource=r.resource,
                    subject_id=r.subject_id,
                    scopes=r.scopes,
                    request_id=r.request_id,
                )
                for r in rows
            ]

    async def purge(self, *, batch: int = 1000) -> int:
        """Delete rows past the retention period (the only deletion the triggers allow)."""
        cutoff = self._clock.now() - self.retention
        async with self._db.write() as conn:
            ids = select(audit_log.c.id).where(audit_log.c.at < cutoff).limit(batch).scalar_subquery()
            result = await conn.execute(delete(audit_log).where(audit_log.c.id.in_(ids)))
            return int(result.rowcount)
