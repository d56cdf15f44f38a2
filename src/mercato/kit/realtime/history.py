"""`SqlChannelHistory`: sequenced channel events kept in the database (the `History` port).

`append` gives the event the channel's next seq in the caller's transaction, and returns the first
seq again for a `dedup_key` it has seen (a redelivered message): one event, one seq, forever. A new
event is one statement (the next seq taken in the insert, a seen `dedup_key` skipped by its unique key). Two
appends racing for one seq collide on the primary key; the loser's transaction fails and is retried
by its caller (a stream consumer redelivers), so seqs stay gap-free.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import Insert, and_, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.realtime.events import ChannelEvent
from mercato.kit.realtime.tables import channel_history
from mercato.kit.storage import Database

__all__ = ["SqlChannelHistory"]

_HISTORY_COLUMNS = ("channel", "seq", "type", "data", "dedup_key", "created_at")
_append_statements: dict[str, Insert] = {}


def _append_statement(dialect: str) -> Insert:
    """`INSERT … SELECT next seq … ON CONFLICT (channel, dedup_key) DO NOTHING RETURNING seq`, built
    once per dialect (both have the upsert clause; typed parameters, so PostgreSQL casts them)."""
    statement = _append_statements.get(dialect)
    if statement is None:
        t = channel_history.c
        channel = bindparam("b_channel", type_=t.channel.type)
        next_seq = select(
            channel,
            func.coalesce(func.max(t.seq), 0) + 1,
            bindparam("b_type", type_=t.type.type),
            bindparam("b_data", type_=t.data.type),
            bindparam("b_dedup", type_=t.dedup_key.type),
            bindparam("b_at", type_=t.created_at.type),
        ).where(t.channel == channel)
        make = postgresql_insert if dialect == "postgresql" else sqlite_insert
        statement = (
            make(channel_history)
            .from_select(_HISTORY_COLUMNS, next_seq)
            .on_conflict_do_nothing(index_elements=["channel", "dedup_key"])
            .returning(t.seq)
        )
        _append_statements[dialect] = statement
    return statement


_EXISTING = select(channel_history.c.seq, channel_history.c.type, channel_history.c.data).where(
    channel_history.c.channel == bindparam("b_channel"), channel_history.c.dedup_key == bindparam("b_dedup")
)


class SqlChannelHistory:
    def __init__(self, db: Database, *, clock: Clock | None = None) -> None:
        self._db = db
        self._clock = clock or SystemClock()

    async def append(
        self, conn: AsyncConnection, channel: str, event_type: str, data: dict[str, Any], *, dedup_key: str
    ) -> tuple[ChannelEvent, bool]:
        """The stored event and whether it is new (False: `dedup_key` was appended before).

        One statement for a new event (ADR 0071): the insert takes the channel's next seq from the
        table itself and skips a `dedup_key` already there (its unique key); only then is the first
        append's event read back. Was three statements built per call (the dedup read, the max seq,
        the insert)."""
        params = {
            "b_channel": channel,
            "b_type": event_type,
            "b_data": orjson.dumps(data).decode(),
            "b_dedup": dedup_key,
            "b_at": self._clock.now(),
        }
        inserted = (await conn.execute(_append_statement(conn.dialect.name), params)).first()
        if inserted is not None:
            return ChannelEvent(channel, event_type, data, seq=int(inserted[0]), at=time.time()), True
        existing = (await conn.execute(_EXISTING, {"b_channel": channel, "b_dedup": dedup_key})).one()
        return ChannelEvent(channel, existing.type, orjson.loads(existing.data), seq=existing.seq), False

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
