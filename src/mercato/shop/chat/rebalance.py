"""Online rebalancing of the chat shards: copy -> dual-write -> verify -> switch -> clean up (ADR 0043).

1. The new layout is saved as the map's `target`. After `propagation_s` every process dual-writes the
   rooms whose owner changes (old owner first: it stays the authority; then the new owner).
2. Copy: each moving room's messages are copied to the new owner (insert-or-ignore; no lock).
3. Verify and switch, room by room: on the old owner, under the room's advisory lock taken exclusively
   (in-flight writes finish first, new ones wait), the room is fenced, the delta since the copy is
   copied, and the new owner must hold exactly the old owner's rows (else the fence rolls back and the
   move fails loudly). Then the map marks the room switched. A stale writer hits the fence, reloads the
   map and writes to the new owner.
4. When no moving room is left (rooms whose first message arrived meanwhile are picked up by another
   round), the target becomes the current layout.
5. Clean up after `propagation_s`: each shard deletes the rows of rooms it no longer owns, each room
   verified (copied, compared) on its owner first.

Writes never stop: a room is blocked only for its own fence transaction.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import make_url

from mercato.kit.errors import Conflict
from mercato.kit.partitioning import Move, skew
from mercato.kit.storage import Database
from mercato.shop.chat.shardmap import MAIN, Layout, ShardMap
from mercato.shop.chat.shards import ChatShards, insert_ignoring_duplicates, lock_room
from mercato.shop.chat.tables import messages, shard_fences

__all__ = [
    "ChatRebalancer",
    "MoveVerificationFailed",
    "RebalanceInProgress",
    "RebalanceReport",
    "shard_status",
]

Progress = Callable[[str, int, int], None]


class RebalanceInProgress(Conflict):
    slug = "chat-rebalance-in-progress"
    title = "A chat shard rebalance is already in progress"
    description = "Finish it first (`mercato shards rebalance`)."


class MoveVerificationFailed(RuntimeError):
    """The new owner does not hold exactly the old owner's rows for a room: the move stopped."""


@dataclass
class RebalanceReport:
    epoch: int = 0
    planned_rooms: int = 0
    moved_rooms: int = 0
    moved_messages: int = 0
    rounds: int = 0
    cleaned_messages: int = 0
    duration_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_COLUMNS = (messages.c.seq, messages.c.sender, messages.c.client_msg_id, messages.c.text, messages.c.sent_at)


async def _rows(db: Database, room: uuid.UUID, conn: Any = None) -> list[dict[str, Any]]:
    query = select(messages).where(messages.c.room_id == room).order_by(messages.c.seq)
    if conn is not None:
        return [dict(r._mapping) for r in await conn.execute(query)]
    async with db.read() as c:
        return [dict(r._mapping) for r in await c.execute(query)]


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["seq"], row["sender"], row["client_msg_id"], row["text"], row["sent_at"].timestamp())


class ChatRebalancer:
    def __init__(self, shards: ChatShards, *, batch: int = 1, progress: Progress | None = None) -> None:
        self._shards = shards
        self._batch = batch
        self._progress = progress

    async def ensure_schema(self, db: Database) -> None:
        """A new shard gets the two tables a shard needs (the main database has them by migration)."""
        async with db.write() as conn:
            await conn.run_sync(
                lambda sync: messages.metadata.create_all(sync, tables=[messages, shard_fences])
            )

    async def prepare(self) -> list[str]:
        """Give every shard of the map other than the main database its tables (`mercato migrate`)."""
        current = await self._shards.current(force=True)
        prepared = []
        for name, url in current.shards:
            if url != MAIN:
                await self.ensure_schema(self._shards.db(name, current))
                prepared.append(name)
        return prepared

    async def add_shard(self, url: str, *, name: str | None = None) -> RebalanceReport:
        current = await self._shards.current(force=True)
        if current.target is not None:
            raise RebalanceInProgress(
                "a rebalance is in progress; run `mercato shards rebalance` to finish it"
            )
        name = name or f"s{len(current.shards)}"
        if name in current.names or url in {u for _, u in current.shards if u != MAIN}:
            raise RebalanceInProgress(f"shard {name} / that URL is already in the map")
        target = Layout((*current.current.members, name), current.current.overrides)
        new = current.with_target(target, add=(name, url))
        await self.ensure_schema(self._shards.db(name, new))
        await self._shards.save(new)
        return await self.run()

    async def pin(self, room: uuid.UUID, shard: str) -> RebalanceReport:
        """A hot room on a shard of its own choosing (the directory's override), moved online."""
        current = await self._shards.current(force=True)
        if current.target is not None:
            raise RebalanceInProgress(
                "a rebalance is in progress; run `mercato shards rebalance` to finish it"
            )
        overrides = {**current.current.overrides, str(room): shard}
        await self._shards.save(current.with_target(Layout(current.current.members, overrides)))
        return await self.run()

    async def run(self) -> RebalanceReport:
        """Carry the map's pending target through to the end (resumable: every step is idempotent)."""
        started = time.monotonic()
        shards = await self._shards.current(force=True)
        report = RebalanceReport(epoch=shards.epoch)
        if shards.target is None:
            return report
        await asyncio.sleep(self._shards.propagation_s)  # from here on, every writer dual-writes
        report.phases_s["propagate"] = time.monotonic() - started
        while True:
            shards = await self._shards.current(force=True)
            moves = await self._pending(shards)
            if not moves:
                break
            report.rounds += 1
            report.planned_rooms += len(moves)
            phase = time.monotonic()
            for i, move in enumerate(moves):
                await self._copy(shards, move)
                self._tell("copy", i + 1, len(moves))
            report.phases_s["copy"] = report.phases_s.get("copy", 0.0) + time.monotonic() - phase
            phase = time.monotonic()
            for start in range(0, len(moves), self._batch):
                chunk = moves[start : start + self._batch]
                for move in chunk:
                    report.moved_messages += await self._fence_verify(shards, move, exact=True)
                shards = await self._shards.save(shards.with_switched({m.key for m in chunk}))
                report.moved_rooms += len(chunk)
                if self._shards.metrics is not None:
                    self._shards.metrics.moved_rooms.inc(len(chunk))
                self._tell("switch", min(start + self._batch, len(moves)), len(moves))
            report.phases_s["verify_switch"] = (
                report.phases_s.get("verify_switch", 0.0) + time.monotonic() - phase
            )
        final = await self._shards.save(shards.finished())
        await asyncio.sleep(self._shards.propagation_s)  # stale readers of the old owners are gone
        phase = time.monotonic()
        report.cleaned_messages = await self.cleanup(final)
        report.phases_s["cleanup"] = time.monotonic() - phase
        report.epoch = final.epoch
        report.duration_s = time.monotonic() - started
        return report

    def _tell(self, step: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(step, done, total)

    async def _rooms_on(self, db: Database, *, unfenced: bool) -> list[uuid.UUID]:
        query = select(messages.c.room_id).distinct()
        if unfenced:
            query = query.where(messages.c.room_id.not_in(select(shard_fences.c.room_id)))
        async with db.read() as conn:
            return [r.room_id for r in await conn.execute(query)]

    async def _pending(self, shards: ShardMap) -> list[Move]:
        moves: list[Move] = []
        for name in shards.current.members:
            for room in await self._rooms_on(self._shards.db(name, shards), unfenced=True):
                route = shards.route(str(room))
                if route.also is not None and route.write == name:
                    moves.append(Move(str(room), name, route.also))
        return moves

    async def _copy(self, shards: ShardMap, move: Move) -> None:
        rows = await _rows(self._shards.db(move.source, shards), uuid.UUID(move.key))
        if rows:
            target = self._shards.db(move.target, shards)
            async with target.write() as conn:
                await conn.execute(insert_ignoring_duplicates(target.dialect, messages), rows)

    async def _fence_verify(self, shards: ShardMap, move: Move, *, exact: bool) -> int:
        """Fence the room on its source (writes wait for the lock, then are refused), copy the delta,
        and check the target holds the source's rows (exactly, during a move). Returns the row count."""
        room = uuid.UUID(move.key)
        source, target = self._shards.db(move.source, shards), self._shards.db(move.target, shards)
        async with source.write() as conn:
            await lock_room(conn, room, exclusive=True)
            fenced = (
                await conn.execute(select(shard_fences.c.room_id).where(shard_fences.c.room_id == room))
            ).first()
            if fenced is None:
                await conn.execute(
                    shard_fences.insert().values(
                        room_id=room,
                        moved_to=move.target,
                        epoch=shards.epoch,
                        fenced_at=self._shards.clock.now(),
                    )
                )
            rows = await _rows(source, room, conn)
            async with target.write() as tconn:
                await tconn.execute(delete(shard_fences).where(shard_fences.c.room_id == room))
                if rows:
                    await tconn.execute(insert_ignoring_duplicates(target.dialect, messages), rows)
                held = await _rows(target, room, tconn)
            mine, theirs = {_key(r) for r in rows}, {_key(r) for r in held}
            if (mine != theirs) if exact else not mine <= theirs:
                raise MoveVerificationFailed(
                    f"room {room}: {move.target} holds {len(theirs)} rows, {move.source} {len(mine)}"
                )
        return len(rows)

    async def cleanup(self, shards: ShardMap) -> int:
        """Delete, on each shard, the messages of rooms it does not own (each verified on its owner)."""
        deleted = 0
        directory = shards.directory()
        for name in shards.names:
            db = self._shards.db(name, shards)
            async with db.read() as conn:
                fenced = {
                    r.room_id: r.moved_to
                    for r in await conn.execute(select(shard_fences.c.room_id, shard_fences.c.moved_to))
                }
            for room in await self._rooms_on(db, unfenced=False):
                owner = directory.owner(str(room))
                if owner == name:
                    continue
                if fenced.get(room) != owner:  # not verified at its switch (a late room): verify now
                    await self._fence_verify(shards, Move(str(room), name, owner), exact=False)
                async with db.write() as conn:
                    done = await conn.execute(delete(messages).where(messages.c.room_id == room))
                    deleted += done.rowcount or 0
        return deleted


def _mask(url: str) -> str:
    return url if url == MAIN else make_url(url).render_as_string(hide_password=True)


async def shard_status(shards: ChatShards) -> dict[str, Any]:
    """The map and, per shard, its messages, rooms and fences; skew of messages over the members."""
    current = await shards.current(force=True)
    per: list[dict[str, Any]] = []
    for name, url in current.shards:
        async with shards.db(name, current).read() as conn:
            count = int((await conn.execute(select(func.count()).select_from(messages))).scalar_one())
            rooms = int((await conn.execute(select(func.count(messages.c.room_id.distinct())))).scalar_one())
            fences = int((await conn.execute(select(func.count()).select_from(shard_fences))).scalar_one())
        role = "member" if name in current.current.members else "joining"
        per.append(
            {
                "shard": name,
                "url": _mask(url),
                "role": role,
                "messages": count,
                "rooms": rooms,
                "fences": fences,
            }
        )
    members = {p["shard"]: float(p["messages"]) for p in per if p["role"] == "member"}
    return {
        "epoch": current.epoch,
        "algorithm": current.algorithm,
        "vnodes": current.vnodes,
        "members": list(current.current.members),
        "overrides": dict(current.current.overrides),
        "rebalancing_to": list(current.target.members) if current.target else None,
        "switched_rooms": len(current.switched),
        "skew": round(skew(members), 3),
        "shards": per,
    }
