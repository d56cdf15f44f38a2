"""Chat messages across shard databases: the cached shard map, one `Database` per shard, and the
message reads and writes that follow `ShardMap.route` (ADR 0043).

A room's reads touch one shard. A write during the room's move goes to the old owner first (the
authority until the switch) and then to the new one. The old owner refuses a write for a room it has
fenced (`chat_shard_fences`), checked in the write's own transaction under a per-room advisory lock
that the mover takes exclusively: a process whose map is stale cannot leave a message behind on a
shard that no longer owns the room; it reloads the map and retries on the new owner.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import and_, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from mercato.kit.clock import Clock
from mercato.kit.errors import Conflict
from mercato.kit.partitioning import stable_hash64
from mercato.kit.storage import Database
from mercato.shop.chat.model import ChatMessage
from mercato.shop.chat.shardmap import MAIN, Route, ShardMap
from mercato.shop.chat.shards_pg import persist_rooms_pg, release_pass_connection, warm_pass_pg
from mercato.shop.chat.tables import messages, shard_fences, shard_map

__all__ = [
    "ChatShardMetrics",
    "ChatShards",
    "Position",
    "ShardMapConflict",
    "ShardMoved",
    "ShardUnavailable",
    "assign",
    "insert_ignoring_duplicates",
    "lock_room",
    "message_of",
    "recent_messages",
    "room_lock_key",
    "row_of",
]


class ShardMoved(Exception):
    """The shard refused the write: the room's messages moved away (the caller's map is stale)."""


class ShardMapConflict(Conflict):
    slug = "chat-shard-map-conflict"
    title = "The shard map changed meanwhile"
    description = "Another operator changed the chat shard map; read it again and retry."


class ShardUnavailable(ConnectionError):
    """The room's shard is unreachable, or its move did not finish within the retry window."""


class ChatShardMetrics:
    """Per-shard load (`mercato_chat_shard_*`) and skew: this process's writes per shard, max/mean."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.writes = Counter(
            "mercato_chat_shard_writes_total",
            "Chat messages written, per shard.",
            ["shard"],
            registry=registry,
        )
        self.reads = Counter(
            "mercato_chat_shard_reads_total", "Chat history reads, per shard.", ["shard"], registry=registry
        )
        self.skew = Gauge(
            "mercato_chat_shard_write_skew_ratio",
            "Busiest shard's writes over the mean across shards (1.0 = even).",
            registry=registry,
        )
        self.epoch = Gauge(
            "mercato_chat_shard_map_epoch", "Epoch of the shard map in use.", registry=registry
        )
        self.stale_retries = Counter(
            "mercato_chat_shard_stale_map_retries_total",
            "Writes refused by a fenced shard and retried after reloading the map.",
            registry=registry,
        )
        self.moved_rooms = Counter(
            "mercato_chat_shard_moved_rooms_total", "Rooms whose messages moved shard.", registry=registry
        )
        self._tally: Tally[str] = Tally()

    def wrote(self, shard: str, names: Sequence[str]) -> None:
        self.writes.labels(shard).inc()
        self._tally[shard] += 1
        counts = [self._tally[n] for n in names]
        mean = sum(counts) / len(counts) if counts else 0
        self.skew.set(max(counts) / mean if mean else 0.0)


def room_lock_key(room_id: uuid.UUID) -> int:
    """The room's advisory-lock key: a signed 64-bit hash of its id."""
    h = stable_hash64(str(room_id))
    return h - (1 << 64) if h >= 1 << 63 else h


def insert_ignoring_duplicates(dialect: str, table: Any) -> Insert:
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


class ChatShards:
    """The shard map cache and a `Database` per shard (the main one for `main`, others on first use)."""

    def __init__(
        self,
        main: Database,
        clock: Clock,
        *,
        initial: ShardMap,
        refresh_s: float = 1.0,
        connect: Callable[[str], Database] | None = None,
        metrics: ChatShardMetrics | None = None,
    ) -> None:
        self.main = main
        self.clock = clock
        self.refresh_s = refresh_s
        self.metrics = metrics
        self._initial = initial
        self._connect = connect
        self._dbs: dict[str, Database] = {}
        self._map: ShardMap | None = None
        self._loaded_at = 0.0

    @property
    def propagation_s(self) -> float:
        """How long after a save every process has the new map (cache refresh, twice, plus margin)."""
        return 2 * self.refresh_s + 0.2

    async def current(self, *, force: bool = False) -> ShardMap:
        if force or self._map is None or time.monotonic() - self._loaded_at >= self.refresh_s:
            async with self.main.read() as conn:
                row = (await conn.execute(select(shard_map.c.epoch, shard_map.c.body))).first()
            self._map = self._initial if row is None else ShardMap.from_json(int(row.epoch), str(row.body))
            self._loaded_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.epoch.set(self._map.epoch)
        return self._map

    async def save(self, new: ShardMap) -> ShardMap:
        """Compare-and-set: `new.epoch` must be the stored epoch + 1 (0 -> 1 inserts the row)."""
        now = self.clock.now()
        async with self.main.write() as conn:
            if new.epoch == 1:
                exists = (await conn.execute(select(shard_map.c.epoch))).first()
                if exists is None:
                    await conn.execute(
                        insert(shard_map).values(id=1, epoch=1, body=new.to_json(), updated_at=now)
                    )
                    self._map, self._loaded_at = new, time.monotonic()
                    return new
            done = await conn.execute(
                update(shard_map)
                .where(and_(shard_map.c.id == 1, shard_map.c.epoch == new.epoch - 1))
                .values(epoch=new.epoch, body=new.to_json(), updated_at=now)
            )
            if done.rowcount != 1:
                raise ShardMapConflict(f"the shard map is no longer at epoch {new.epoch - 1}")
        self._map, self._loaded_at = new, time.monotonic()
        return new

    def db(self, name: str, shards: ShardMap) -> Database:
        found = self._dbs.get(name)
        if found is None:
            url = shards.url(name)
            if url == MAIN:
                found = self.main
            elif self._connect is None:
                raise ShardUnavailable(f"shard {name} is not reachable from this process")
            else:
                found = self._connect(url)
            self._dbs[name] = found
        return found

    async def warm(self) -> None:
        """Prepare each writable shard's persisting pass (PostgreSQL; ADR 0090), before the first
        message of this process needs it."""
        shards = await self.current()
        names: set[str] = set()
        for layout in (shards.current, shards.target):
            if layout is not None:
                names |= {*layout.members, *layout.overrides.values()}
        for name in sorted(names):
            db = self.db(name, shards)
            if db.dialect == "postgresql":
                await warm_pass_pg(db, self.clock.now())

    async def close(self) -> None:
        for db in {self.main, *self._dbs.values()}:
            await release_pass_connection(db)
        for db in self._dbs.values():
            if db is not self.main:
                await db.dispose()
        self._dbs.clear()

    # -- messages ------------------------------------------------------------------------------

    async def route(self, room_id: uuid.UUID, *, force: bool = False) -> tuple[ShardMap, Route]:
        shards = await self.current(force=force)
        return shards, shards.route(str(room_id))

    async def history(
        self, room_id: uuid.UUID, *, after: int, horizon: datetime, limit: int
    ) -> list[ChatMessage]:
        shards, route = await self.route(room_id)
        if self.metrics is not None:
            self.metrics.reads.labels(route.read).inc()
        async with self.db(route.read, shards).read() as conn:
            rows = await conn.execute(
                select(messages)
                .where(
                    and_(messages.c.room_id == room_id, messages.c.seq > after, messages.c.sent_at >= horizon)
                )
                .order_by(messages.c.seq)
                .limit(limit)
            )
            return [message_of(r) for r in rows]

    async def head(self, room_id: uuid.UUID) -> int:
        shards, route = await self.route(room_id)
        async with self.db(route.read, shards).read() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.coalesce(func.max(messages.c.seq), 0)).where(
                            messages.c.room_id == room_id
                        )
                    )
                ).scalar_one()
            )

    async def persist(
        self, room_id: uuid.UUID, *, sender: str, text_: str, client_msg_id: str, retry_for_s: float = 5.0
    ) -> tuple[ChatMessage, bool]:
        (found,) = await self.persist_batch(
            room_id, [(sender, text_, client_msg_id)], retry_for_s=retry_for_s
        )
        return found

    async def persist_batch(
        self, room_id: uuid.UUID, items: Sequence[Draft], *, retry_for_s: float = 5.0
    ) -> list[tuple[ChatMessage, bool]]:
        """Store a room's messages, in the given order, in one transaction on the room's owner (and
        its move target, if it is moving): group commit (ADR 0056). Each gets the room's next seq
        unless its (sender, client_msg_id) was stored before or earlier in the batch, which returns
        that message and False. A fenced owner means the map is stale: reload and retry until
        `retry_for_s`, then 503 (the stream redelivers)."""
        give_up = time.monotonic() + retry_for_s
        force = False
        while True:
            shards, route = await self.route(room_id, force=force)
            try:
                stored = await _persist_on(self.db(route.write, shards), room_id, items, self.clock.now())
            except ShardMoved:
                if self.metrics is not None:
                    self.metrics.stale_retries.inc()
                if time.monotonic() > give_up:
                    raise ShardUnavailable(f"room {room_id} is being moved; try again") from None
                force = True
                await asyncio.sleep(0.02)
                continue
            if route.also is not None:
                target = self.db(route.also, shards)
                async with target.write() as conn:
                    await conn.execute(
                        insert_ignoring_duplicates(target.dialect, messages),
                        [row_of(m) for m, _new in stored],
                    )
            if self.metrics is not None:
                for _m, new in stored:
                    if new:
                        self.metrics.wrote(route.write, shards.names)
            return stored

    async def persist_rooms(
        self, batches: dict[uuid.UUID, list[Draft]]
    ) -> dict[uuid.UUID, list[tuple[ChatMessage, bool]]]:
        """Several rooms' batches, one transaction per shard for all of them (group commit across
        rooms: a pass of the persister typically holds one message for each of many rooms). A room
        found fenced (its map entry was stale) is retried alone through `persist_batch`, which
        reloads the map; its failure fails only that room (raised after the others are stored)."""
        shards = await self.current()
        by_shard: dict[str, dict[uuid.UUID, list[Draft]]] = {}
        routes: dict[uuid.UUID, Route] = {}
        for room_id, items in batches.items():
            route = routes[room_id] = shards.route(str(room_id))
            by_shard.setdefault(route.write, {})[room_id] = items
        stored: dict[uuid.UUID, list[tuple[ChatMessage, bool]]] = {}
        fenced: list[uuid.UUID] = []
        for name, rooms_items in by_shard.items():
            done, moved = await _persist_rooms_on(self.db(name, shards), rooms_items, self.clock.now())
            stored.update(done)
            fenced += moved
        also: dict[str, list[dict[str, Any]]] = {}
        for room_id, results in stored.items():
            target = routes[room_id].also
            if target is not None:
                also.setdefault(target, []).extend(row_of(m) for m, _new in results)
        for name, rows in also.items():
            target_db = self.db(name, shards)
            async with target_db.write() as conn:
                await conn.execute(insert_ignoring_duplicates(target_db.dialect, messages), rows)
        if self.metrics is not None:
            for room_id, results in stored.items():
                for _m, new in results:
                    if new:
                        self.metrics.wrote(routes[room_id].write, shards.names)
        for room_id in fenced:
            if self.metrics is not None:
                self.metrics.stale_retries.inc()
            stored[room_id] = await self.persist_batch(room_id, batches[room_id])
        return stored


# (sender, text, client_msg_id): one message to persist.
Draft = tuple[str, str, str]


def row_of(m: ChatMessage) -> dict[str, Any]:
    return {
        "room_id": m.room_id,
        "seq": m.seq,
        "sender": m.sender,
        "text": m.text,
        "client_msg_id": m.client_msg_id,
        "sent_at": m.sent_at,
    }


def message_of(row: Any) -> ChatMessage:
    return ChatMessage(row.room_id, row.seq, row.sender, row.text, row.client_msg_id, row.sent_at)


async def lock_room(conn: AsyncConnection, room_id: uuid.UUID, *, exclusive: bool) -> None:
    """Writers hold the room's advisory lock shared, the mover exclusively (PostgreSQL; SQLite's
    writes are serialized per database anyway)."""
    if conn.dialect.name == "postgresql":
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        await conn.execute(text(f"SELECT {fn}(:k)"), {"k": room_lock_key(room_id)})


async def lock_rooms_shared(conn: AsyncConnection, room_ids: Sequence[uuid.UUID]) -> None:
    """`lock_room(..., exclusive=False)` for many rooms in one statement, in key order."""
    if conn.dialect.name == "postgresql" and room_ids:
        keys = sorted(room_lock_key(r) for r in room_ids)
        await conn.execute(
            text(
                "SELECT pg_advisory_xact_lock_shared(k) "
                "FROM (SELECT k FROM unnest(CAST(:keys AS bigint[])) AS k ORDER BY k) AS ordered"
            ),
            {"keys": keys},
        )


async def _persist_on(
    db: Database, room_id: uuid.UUID, items: Sequence[Draft], now: datetime
) -> list[tuple[ChatMessage, bool]]:
    async with db.write() as conn:
        await lock_room(conn, room_id, exclusive=False)
        fenced = (
            await conn.execute(select(shard_fences.c.room_id).where(shard_fences.c.room_id == room_id))
        ).first()
        if fenced is not None:
            raise ShardMoved(str(room_id))
        # One read for the whole batch's dedup (the unique index covers room + sender + id).
        ids = sorted({client_msg_id for _s, _t, client_msg_id in items})
        known = {
            (row.sender, row.client_msg_id): message_of(row)
            for row in await conn.execute(
                select(messages).where(and_(messages.c.room_id == room_id, messages.c.client_msg_id.in_(ids)))
            )
        }
        head = int(
            (
                await conn.execute(
                    select(func.coalesce(func.max(messages.c.seq), 0)).where(messages.c.room_id == room_id)
                )
            ).scalar_one()
        )
        stored: list[tuple[ChatMessage, bool]] = []
        rows: list[dict[str, Any]] = []
        for sender, text_, client_msg_id in items:
            seen = known.get((sender, client_msg_id))
            if seen is not None:
                stored.append((seen, False))
                continue
            head += 1
            message = ChatMessage(room_id, head, sender, text_, client_msg_id, now)
            known[(sender, client_msg_id)] = message
            rows.append(row_of(message))
            stored.append((message, True))
        if rows:
            await conn.execute(insert(messages), rows)
    return stored


async def _persist_rooms_on(
    db: Database, batches: dict[uuid.UUID, list[Draft]], now: datetime
) -> tuple[dict[uuid.UUID, list[tuple[ChatMessage, bool]]], list[uuid.UUID]]:
    """`_persist_on` for many rooms of one shard in one transaction, with a constant number of
    statements: the fences, the dedup lookup, the heads (one row) and one multi-row insert.
    Returns the stored rooms and the fenced ones (left for the caller to retry)."""
    room_ids = sorted(batches)
    if db.dialect == "postgresql":
        return await persist_rooms_pg(db, batches, room_ids, now)
    async with db.write() as conn:
        await lock_rooms_shared(conn, room_ids)
        fenced = {
            row.room_id
            for row in await conn.execute(
                select(shard_fences.c.room_id).where(shard_fences.c.room_id.in_(room_ids))
            )
        }
        live = [r for r in room_ids if r not in fenced]
        if not live:
            return {}, sorted(fenced)
        ids = sorted({client_msg_id for r in live for _s, _t, client_msg_id in batches[r]})
        known = {
            (row.room_id, row.sender, row.client_msg_id): message_of(row)
            for row in await conn.execute(
                select(messages).where(and_(messages.c.room_id.in_(live), messages.c.client_msg_id.in_(ids)))
            )
        }
        # One row, a column per room: each a `max(seq)` of its own, which the databases answer
        # from the end of the primary key; grouped, the max read every message of the rooms.
        head_row = (
            await conn.execute(
                select(
                    *(
                        select(func.max(messages.c.seq))
                        .where(messages.c.room_id == room_id)
                        .scalar_subquery()
                        for room_id in live
                    )
                )
            )
        ).one()
        heads = {room_id: int(head) for room_id, head in zip(live, head_row, strict=True) if head is not None}
        stored, new = assign(live, batches, known, heads, now)
        if new:
            await conn.execute(insert(messages), [row_of(m) for m in new])
    return stored, sorted(fenced)


def assign(
    room_ids: Sequence[uuid.UUID],
    batches: dict[uuid.UUID, list[Draft]],
    known: dict[tuple[uuid.UUID, str, str], ChatMessage],
    heads: dict[uuid.UUID, int],
    now: datetime,
) -> tuple[dict[uuid.UUID, list[tuple[ChatMessage, bool]]], list[ChatMessage]]:
    """Each room's drafts in order: a known (room, sender, client_msg_id) returns its message and
    False, a new one takes the room's next seq. Returns the results and the messages to insert."""
    stored: dict[uuid.UUID, list[tuple[ChatMessage, bool]]] = {}
    new: list[ChatMessage] = []
    for room_id in room_ids:
        head = heads.get(room_id, 0)
        results = stored[room_id] = []
        for sender, text_, client_msg_id in batches[room_id]:
            seen = known.get((room_id, sender, client_msg_id))
            if seen is not None:
                results.append((seen, False))
                continue
            head += 1
            message = ChatMessage(room_id, head, sender, text_, client_msg_id, now)
            known[(room_id, sender, client_msg_id)] = message
            new.append(message)
            results.append((message, True))
    return stored, new


Position = tuple[datetime, uuid.UUID, int]  # (sent_at, room, seq): the scatter-gather keyset


async def recent_messages(
    shards: ChatShards, *, sender: str | None, limit: int, before: Position | None = None
) -> list[ChatMessage]:
    """Scatter-gather for operators: the newest messages across every shard (optionally one
    sender's), older than `before`, each counted once, from the shard the map reads its room from."""
    current = await shards.current()

    async def one(name: str) -> list[tuple[str, ChatMessage]]:
        order = (messages.c.sent_at.desc(), messages.c.room_id.desc(), messages.c.seq.desc())
        query = select(messages).order_by(*order).limit(limit)
        if sender is not None:
            query = query.where(messages.c.sender == sender)
        if before is not None:
            at, room, seq = before
            query = query.where(
                or_(
                    messages.c.sent_at < at,
                    and_(
                        messages.c.sent_at == at,
                        or_(
                            messages.c.room_id < room, and_(messages.c.room_id == room, messages.c.seq < seq)
                        ),
                    ),
                )
            )
        async with shards.db(name, current).read() as conn:
            return [(name, message_of(r)) for r in await conn.execute(query)]

    gathered = await asyncio.gather(*(one(name) for name in current.names))
    found = [m for per in gathered for name, m in per if current.route(str(m.room_id)).read == name]
    found.sort(key=lambda m: (m.sent_at, m.room_id, m.seq), reverse=True)
    return found[:limit]
