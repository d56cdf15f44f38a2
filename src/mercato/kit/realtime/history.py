"""`SqlChannelHistory`: sequenced channel events kept in the database (the `History` port).

`append` gives the event the channel's next seq in the caller's transaction, and returns the first
seq again for a `dedup_key` it has seen (a redelivered message): one event, one seq, forever. A new
event is one statement (the next seq taken in the insert, a seen `dedup_key` skipped by its unique key). Two
appends racing for one seq collide on the primary key; the loser's transaction fails and is retried
by its caller (a stream consumer redelivers), so seqs stay gap-free.

`append_many` is a whole consumer pass's events, committed: on PostgreSQL one autocommitted
statement on the driver path (the same numbering, dedup and collisions, for every channel of the pass
at once); elsewhere `append` per event in one write transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import Insert, and_, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.realtime.events import ChannelEvent
from mercato.kit.realtime.tables import channel_history
from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads, driver_prepared

__all__ = ["HistoryItem", "SqlChannelHistory"]

# (channel, event type, data, dedup_key): one event to append.
HistoryItem = tuple[str, str, dict[str, Any], str]

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


# A pass's events in one statement (PostgreSQL): those whose dedup_key the channel holds come back
# as stored (`seen`); the others are numbered after their channel's head in input order and inserted.
# Rows: (new, channel, dedup_key, seq, type, data); type and data only for the seen ones.
_APPEND_MANY = driver_prepared(
    text(
        "WITH input AS ("
        " SELECT * FROM unnest(CAST(:channels AS varchar[]), CAST(:types AS varchar[]),"
        " CAST(:datas AS text[]), CAST(:keys AS varchar[]))"
        " WITH ORDINALITY AS i(channel, type, data, dedup_key, ord)"
        "), seen AS ("
        " SELECT h.channel, h.dedup_key, h.seq, h.type, h.data FROM realtime_channel_history h"
        " JOIN input i ON h.channel = i.channel AND h.dedup_key = i.dedup_key"
        "), fresh AS ("
        " SELECT i.channel, i.type, i.data, i.dedup_key,"
        " row_number() OVER (PARTITION BY i.channel ORDER BY i.ord) AS rn FROM input i"
        " WHERE NOT EXISTS (SELECT 1 FROM seen s WHERE s.channel = i.channel AND s.dedup_key = i.dedup_key)"
        "), heads AS ("
        " SELECT h.channel, max(h.seq) AS head FROM realtime_channel_history h"
        " WHERE h.channel IN (SELECT channel FROM fresh) GROUP BY h.channel"
        "), added AS ("
        " INSERT INTO realtime_channel_history (channel, seq, type, data, dedup_key, created_at)"
        " SELECT f.channel, coalesce(hd.head, 0) + f.rn, f.type, f.data, f.dedup_key,"
        " CAST(:at AS timestamptz)"
        " FROM fresh f LEFT JOIN heads hd ON hd.channel = f.channel ORDER BY f.channel, f.rn"
        " ON CONFLICT (channel, dedup_key) DO NOTHING RETURNING channel, dedup_key, seq"
        ") SELECT true, channel, dedup_key, seq, CAST(NULL AS varchar), CAST(NULL AS text) FROM added"
        " UNION ALL SELECT false, channel, dedup_key, seq, type, data FROM seen"
    ).bindparams(
        bindparam("channels"), bindparam("types"), bindparam("datas"), bindparam("keys"), bindparam("at")
    )
)


class SqlChannelHistory:
    def __init__(self, db: Database, *, clock: Clock | None = None) -> None:
        self._db = db
        self._clock = clock or SystemClock()
        self._driver = DriverReads(db) if db.dialect == "postgresql" else None

    async def append_many(self, items: Sequence[HistoryItem]) -> list[ChannelEvent]:
        """Each item's stored event, in order, committed: a new one numbered after its channel's
        head (input order within a channel), a `dedup_key` the channel holds (or an earlier item
        carries) its first event again. On PostgreSQL one autocommitted statement where a write
        transaction of one statement per event took N + 2 round trips through SQLAlchemy (most of
        the live order feed's cost in the API process); a seq collision with a concurrent append
        fails the whole call, as `append`'s transaction does."""
        if not items:
            return []
        if self._driver is None:
            async with self._db.write() as conn:
                return [(await self.append(conn, c, t, d, dedup_key=k))[0] for c, t, d, k in items]
        first: dict[tuple[str, str], HistoryItem] = {}
        for item in items:
            first.setdefault((item[0], item[3]), item)
        unique = list(first.values())
        rows = await self._driver.rows(
            _APPEND_MANY,
            {
                "channels": [c for c, _t, _d, _k in unique],
                "types": [t for _c, t, _d, _k in unique],
                "datas": [orjson.dumps(d).decode() for _c, _t, d, _k in unique],
                "keys": [k for _c, _t, _d, k in unique],
                "at": self._clock.now(),
            },
        )
        self._db.signals.wrote()
        now = time.time()
        stored: dict[tuple[str, str], ChannelEvent] = {}
        for new, channel, dedup_key, seq, event_type, data in rows:
            if new:
                _c, event_type, fresh, _k = first[(channel, dedup_key)]
                stored[(channel, dedup_key)] = ChannelEvent(channel, event_type, fresh, seq=int(seq), at=now)
            else:
                stored[(channel, dedup_key)] = ChannelEvent(
                    channel, event_type, orjson.loads(data), seq=int(seq)
                )
        return [stored[(c, k)] for c, _t, _d, k in items]

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
