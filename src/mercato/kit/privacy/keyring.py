"""The keyring: each subject's wrapped data key, created on first use and destroyed on erasure."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.privacy.envelope import DataKey, MasterKey
from mercato.kit.privacy.tables import erasures, subject_keys
from mercato.kit.storage import Database, metadata

__all__ = ["Keyring"]


class Keyring:
    """Data keys over a database of their own or the shop's (the caller decides; see tables.py)."""

    def __init__(self, db: Database, master: MasterKey, clock: Clock, *, owns_schema: bool = False) -> None:
        self._db = db
        self._master = master
        self._clock = clock
        self._owns_schema = owns_schema

    @property
    def master(self) -> MasterKey:
        return self._master

    async def dispose(self) -> None:
        """Close the keyring's own database (nothing when it shares the shop's)."""
        if self._owns_schema:
            await self._db.dispose()

    async def ensure_schema(self) -> None:
        """Create the keyring's tables in a keyring database of its own (the shop's database gets
        them from its migrations)."""
        if not self._owns_schema:
            return
        async with self._db.write() as conn:
            await conn.run_sync(
                lambda sync: metadata.create_all(sync, tables=[subject_keys, erasures], checkfirst=True)
            )

    async def create(self, subject_id: uuid.UUID) -> DataKey:
        """A new data key for a new subject. An erased subject never gets a key again."""
        key = self._master.new_data_key(subject_id)
        async with self._db.write() as conn:
            erased = (
                await conn.execute(select(erasures.c.subject_id).where(erasures.c.subject_id == subject_id))
            ).first()
            if erased is not None:
                raise ValueError(f"subject {subject_id} was erased")
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(subject_keys).values(
                            subject_id=subject_id,
                            wrapped_key=self._master.wrap(key),
                            created_at=self._clock.now(),
                        )
                    )
            except IntegrityError:
                existing = await self._get_in(conn, subject_id)
                if existing is None:
                    raise
                return existing
        return key

    async def get(self, subject_id: uuid.UUID) -> DataKey | None:
        """The subject's data key, or None once it was shredded (or never existed)."""
        keys = await self.get_many([subject_id])
        return keys.get(subject_id)

    async def get_many(
        self, subject_ids: Iterable[uuid.UUID], *, conn: AsyncConnection | None = None
    ) -> dict[uuid.UUID, DataKey]:
        """The data keys of those subjects that still have one. `conn`, a connection to the shop's
        database, is used when the keyring lives there (no second connection from the pool)."""
        wanted = list(dict.fromkeys(subject_ids))
        if not wanted:
            return {}
        query = select(subject_keys.c.subject_id, subject_keys.c.wrapped_key).where(
            subject_keys.c.subject_id.in_(wanted)
        )
        if conn is not None and not self._owns_schema:
            rows = list(await conn.execute(query))
        else:
            async with self._db.read() as own:
                rows = list(await own.execute(query))
        return {row.subject_id: self._master.unwrap(row.subject_id, row.wrapped_key) for row in rows}

    async def shred(self, subject_id: uuid.UUID, *, requested_by: str) -> bool:
        """Destroy the subject's data key and record the erasure; True the first time."""
        async with self._db.write() as conn:
            await conn.execute(delete(subject_keys).where(subject_keys.c.subject_id == subject_id))
            seen = (
                await conn.execute(select(erasures.c.subject_id).where(erasures.c.subject_id == subject_id))
            ).first()
            if seen is not None:
                return False
            await conn.execute(
                insert(erasures).values(
                    subject_id=subject_id, erased_at=self._clock.now(), requested_by=requested_by[:64]
                )
            )
        return True

    async def erased(self, subject_id: uuid.UUID) -> bool:
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(erasures.c.subject_id).where(erasures.c.subject_id == subject_id))
            ).first()
        return row is not None

    async def _get_in(self, conn: AsyncConnection, subject_id: uuid.UUID) -> DataKey | None:
        row = (
            await conn.execute(
                select(subject_keys.c.wrapped_key).where(subject_keys.c.subject_id == subject_id)
            )
        ).first()
        return self._master.unwrap(subject_id, row.wrapped_key) if row is not None else None
