"""Breaker reports: each process publishes its breakers' snapshots to a table; anyone can read them.

Breakers stay per process (ADR 0009: each process judges its own path to a dependency, and the
fail-fast path makes no network call). What is shared is the *view*: in distributed mode the
provider calls happen in the `mercato worker` processes, and the operator asks the API
(`/admin/resilience/breakers`), which must show the workers' breakers, not its own idle ones
(ADR 0025). A report older than `ttl_s` belongs to a process that stopped reporting (gone, or
stuck) and is not shown; rows older than `10 * ttl_s` are deleted by the next publisher.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from sqlalchemy import Column, Index, String, Table, Text, delete, insert, select

from mercato.kit.clock import Clock
from mercato.kit.resilience.breaker import BreakerSnapshot
from mercato.kit.storage import Database, UTCDateTime, metadata

__all__ = ["BreakerReport", "BreakerReports", "breaker_reports"]

breaker_reports = Table(
    "resilience_breaker_reports",
    metadata,
    Column("process", String(200), primary_key=True),
    Column("name", String(100), primary_key=True),
    Column("snapshot", Text, nullable=False),
    Column("reported_at", UTCDateTime, nullable=False),
    Index("ix_resilience_breaker_reports_reported_at", "reported_at"),
)


@dataclass(frozen=True, slots=True)
class BreakerReport:
    process: str
    snapshot: BreakerSnapshot
    reported_at: datetime
    age_s: float


class BreakerReports:
    """Publish this process's breakers as `process`; fetch the fresh reports of the others."""

    def __init__(self, db: Database, clock: Clock, *, process: str, ttl_s: float = 10.0) -> None:
        self._db = db
        self._clock = clock
        self.process = process
        self.ttl_s = ttl_s

    async def publish(self, snapshot: Mapping[str, BreakerSnapshot]) -> None:
        """Replace this process's rows with `snapshot` (one transaction) and drop long-dead rows."""
        now = self._clock.now()
        t = breaker_reports.c
        async with self._db.write() as conn:
            await conn.execute(delete(breaker_reports).where(t.process == self.process))
            await conn.execute(
                delete(breaker_reports).where(t.reported_at < now - timedelta(seconds=10 * self.ttl_s))
            )
            if snapshot:
                await conn.execute(
                    insert(breaker_reports),
                    [
                        {
                            "process": self.process,
                            "name": name,
                            "snapshot": orjson.dumps(dict(item)).decode(),
                            "reported_at": now,
                        }
                        for name, item in snapshot.items()
                    ],
                )

    async def withdraw(self) -> None:
        """Delete this process's rows (on clean shutdown: a stopped worker's breakers are not news)."""
        async with self._db.write() as conn:
            await conn.execute(delete(breaker_reports).where(breaker_reports.c.process == self.process))

    async def fetch(self) -> list[BreakerReport]:
        """Other processes' reports younger than `ttl_s`, by process then breaker name."""
        now = self._clock.now()
        t = breaker_reports.c
        query = (
            select(t.process, t.snapshot, t.reported_at)
            .where(t.process != self.process, t.reported_at >= now - timedelta(seconds=self.ttl_s))
            .order_by(t.process, t.name)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            BreakerReport(
                process=row.process,
                snapshot=orjson.loads(row.snapshot),
                reported_at=row.reported_at,
                age_s=max(0.0, (now - row.reported_at).total_seconds()),
            )
            for row in rows
        ]
