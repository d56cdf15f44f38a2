"""Time-bounded leases stored in the database, each term numbered by a fencing token.

A lease gives its holder the right to act for `ttl_s` seconds unless renewed. Clocks and pauses
make "I still hold it" unreliable (a GC pause or a stalled event loop can outlive the lease), so
every acquisition starts a new *term* with a strictly larger fencing token, and the resources the
holder writes check the token: a write carrying an older token than the resource has seen is
refused (Kleppmann, DDIA ch. 8). The lease row is the one place tokens come from, so they grow
monotonically per lease name on any backend.

Acquire is one write transaction: insert the row if absent; otherwise take it over only when it
has expired (or is already ours, which renews without a new term).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, Column, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.storage import Database, UTCDateTime, metadata

leases_table = Table(
    "coordination_leases",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
)


class LeaseLost(Exception):
    """The lease expired and was taken over, or was never held: stop acting on it."""


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    fencing_token: int
    expires_at: datetime

    def valid_at(self, now: datetime) -> bool:
        return now < self.expires_at


class LeaseStore:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def acquire(self, name: str, holder: str, *, ttl_s: float) -> Lease | None:
        """Take the lease, or `None` while someone else holds it unexpired.

        Re-acquiring a lease you still hold extends it and keeps its token; taking over an
        expired one (yours or another's) starts a new term with token + 1.
        """
        now = self._clock.now()
        expires_at = now + timedelta(seconds=ttl_s)
        async with self._db.write() as conn:
            row = (
                await conn.execute(select(leases_table).where(leases_table.c.name == name).with_for_update())
            ).first()
            if row is None:
                try:
                    # A savepoint, so losing an insert race leaves the transaction usable.
                    async with conn.begin_nested():
                        await conn.execute(
                            insert(leases_table).values(
                                name=name,
                                holder=holder,
                                fencing_token=1,
                                expires_at=expires_at,
                                acquired_at=now,
                            )
                        )
                except IntegrityError:
                    return None
                return Lease(name, holder, 1, expires_at)
            still_held = now < row.expires_at
            if still_held and row.holder != holder:
                return None
            token = row.fencing_token if still_held else row.fencing_token + 1
            await conn.execute(
                update(leases_table)
                .where(leases_table.c.name == name)
                .values(
                    holder=holder,
                    fencing_token=token,
                    expires_at=expires_at,
                    acquired_at=row.acquired_at if still_held else now,
                )
            )
            return Lease(name, holder, token, expires_at)

    async def renew(self, lease: Lease, *, ttl_s: float) -> Lease:
        """Extend a lease still held in the same term; `LeaseLost` when it is not."""
        now = self._clock.now()
        expires_at = now + timedelta(seconds=ttl_s)
        async with self._db.write() as conn:
            result = await conn.execute(
                update(leases_table)
                .where(
                    leases_table.c.name == lease.name,
                    leases_table.c.holder == lease.holder,
                    leases_table.c.fencing_token == lease.fencing_token,
                    leases_table.c.expires_at > now,
                )
                .values(expires_at=expires_at)
            )
        if result.rowcount != 1:
            raise LeaseLost(f"lease {lease.name!r} term {lease.fencing_token} is no longer held")
        return Lease(lease.name, lease.holder, lease.fencing_token, expires_at)

    async def release(self, lease: Lease) -> bool:
        """Give the lease up early (expire it now) if this term still holds it."""
        now = self._clock.now()
        async with self._db.write() as conn:
            result = await conn.execute(
                update(leases_table)
                .where(
                    leases_table.c.name == lease.name,
                    leases_table.c.holder == lease.holder,
                    leases_table.c.fencing_token == lease.fencing_token,
                )
                .values(expires_at=now)
            )
        return result.rowcount == 1

    async def holder(self, name: str) -> Lease | None:
        """The current term, expired or not (for status pages)."""
        async with self._db.read() as conn:
            return await current_lease(conn, name)


async def current_lease(conn: AsyncConnection, name: str) -> Lease | None:
    row = (await conn.execute(select(leases_table).where(leases_table.c.name == name))).first()
    if row is None:
        return None
    return Lease(row.name, row.holder, row.fencing_token, row.expires_at)
