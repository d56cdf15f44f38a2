"""`SqlChannelHistory`: sequenced channel events kept in the database (the `History` port).

`append` gives the event the channel's next seq in the caller's transaction, and returns the first
seq again for a `dedup_key` it has seen (a redelivered message): one event, one seq, forever. Two
appends racing for one seq collide on the primary key; the loser's transaction fails and is retried
by its caller (a stream consumer redelivers), so seqs stay gap-free.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import and_, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.realtime.events import ChannelEvent
from mercato.kit.realtime.tables import channel_history
from mercato.kit.storage import Database

__all__ = ["SqlChannelHistory"]


class SqlChannelHistory:
    def __init__(self, db: Database, *, clock: Clock | None = None) -> None:
        self._db = db
        self._clock = clock or SystemClock()

    async def append(
        self, conn: AsyncConnection, channel: str, event_type: str, data: dict[str, Any], *, dedup_key: str
    ) -> tuple[ChannelEvent, bool]:
        """The stored event and whether it is new (False: `dedup_key` was appended before)."""
        t = channel_history.c
        existing = (
            await conn.execute(
                select(t.seq, t.type, t.data).where(and_(t.channel == channel, t.dedup_key == dedup_key))
            )
        ).first()
        if existing is not None:
            return ChannelEvent(channel, existing.type, orjson.loads(existing.data), seq=existing.seq), False
        seq = (
            int(
                (
                    await conn.execute(select(func.coalesce(func.max(t.seq), 0)).where(t.channel == channel))
                ).scalar_one()
            )
            + 1
        )
        await conn.execute(
            insert(channel_history).values(
                channel=channel,
                seq=seq,
                type=event_type,
                data=orjson.dumps(data).decode(),
                dedup_key=dedup_key,
                created_at=self._clock.now(),
            )
        )
        return ChannelEvent(channel, event_type, data, seq=seq, at=time.time()), True

    async def head(self, channel: str) -> int:
        t = channel_history.c
        async with self._db.read() as conn:
            return int(
                (
                    await conn.execute(select(func.coalesce(func.max(t.seq), 0)).where(t.channel == channel))
                ).scalar_one()
            )

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        t = channel_history.c
        async with self._db.read() as conn:
            rows = (
                await conn.execute(
                    select(t.seq, t.type, t.data)
                    .where(and_(t.channel == channel, t.seq > seq))
                    .order_by(t.seq)
                    .limit(limit)
                )
            ).all()
        return [ChannelEvent(channel, row.type, orjson.loads(row.data), seq=row.seq) for row in rows]
