"""`Projector`: keeps a read model up to date from the SQL stream log, and rebuilds it from zero.

A projection is a name, the topics it reads, the tables it owns and an `apply(conn, message,
tables)` function. The projector reads the log from the projection's checkpoint (one position per
topic partition) and, in ONE transaction, applies a batch and moves the checkpoint past it. The
effect and the position commit together or not at all: a crash (process killed, task cancelled,
`apply` raising) after applying some messages but before the commit rolls both back, and the next
pass starts again from the old checkpoint. So a message is never applied twice and never skipped,
without the inbox: the checkpoint is the dedup record, and it costs one row per partition, not one
per message. `apply` needs no idempotency of its own; it must only be deterministic, so a rebuild
gives the same rows as the live projection.

Why read the log table rather than use a consumer group: a group's acknowledgements live outside
the read model's transaction (an ack after commit is at-least-once), and a rebuild needs to start
at offset zero without disturbing the live group. Reading the log by offset gives both.

The log keeps order within a partition (one aggregate's events), not across partitions or topics:
`apply` must not depend on the interleaving of different partitions or topics.

`rebuild()` replays from position zero into fresh copies of the tables (`<table>__rebuild`, no
secondary indexes while loading), in short transactions so live traffic goes on; then one
transaction locks the live checkpoint (the live projector waits), catches the copies up to the
log's head, swaps each copy in by renaming (live -> `__old`, copy -> live, drop `__old`),
recreates the indexes under their canonical names and sets the checkpoint to the copies' positions.
Both PostgreSQL and SQLite run DDL inside transactions, so readers see the old table or the new
one, never neither: on PostgreSQL `ALTER TABLE` takes an ACCESS EXCLUSIVE lock, so readers wait
for the swap's commit and then re-resolve the name to the new table; on SQLite the swap holds the
single write lock and readers keep the snapshot they began with, then re-prepare against the new
schema. Run one rebuild of a projection at a time (the CLI does).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    MetaData,
    Table,
    func,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import conv

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.messaging.message import Message, MessageReader
from mercato.kit.messaging.tables import stream_heads, stream_log
from mercato.kit.observability import get_logger, message_spans
from mercato.kit.projections.hooks import NullProjectionHook, ProjectionHook
from mercato.kit.projections.statements import (
    LOCK_CHECKPOINT,
    SAVE_CHECKPOINT,
    advance_statement,
    cut_ranges,
    probe_statement,
    read_ranges_statement,
    size_class,
)
from mercato.kit.projections.tables import projection_checkpoints
from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads
from mercato.kit.storage.statements_in_tx import on_connection

__all__ = [
    "REBUILD_SUFFIX",
    "Projection",
    "ProjectionHandler",
    "Projector",
    "RebuildIncomplete",
    "RebuildReport",
]

_log = get_logger("mercato.projections")

REBUILD_SUFFIX = "__rebuild"
_OLD_SUFFIX = "__old"

ProjectionHandler = Callable[[AsyncConnection, Message, Mapping[str, Table]], Awaitable[None]]
# Applies messages in the order given, as `apply` would one by one, with fewer statements.
BatchHandler = Callable[[AsyncConnection, Sequence[Message], Mapping[str, Table]], Awaitable[None]]
"""Applies one message to the read model. `tables` maps each owned table's canonical name to the
table to write (the live one, or its rebuild copy): always write through it, never the global."""

_Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Projection:
    """A read model: what it reads, what it owns, how it applies a message.

    Owned tables may declare a primary key and indexes; rebuild copies the columns and primary
    key, loads without indexes, and recreates the indexes after the swap.
    """

    name: str
    topics: tuple[str, ...]
    tables: tuple[Table, ...]
    apply: ProjectionHandler
    # Optional: a pass's messages in one call (one read of the rows they touch, one write each).
    # Must leave the tables as `apply` over the same messages in the same order would.
    apply_batch: BatchHandler | None = None
    # Optional: how `apply` sees a stored message (its data upcast to the current schema version),
    # on live passes and rebuilds alike, so the functions are written against the current version.
    reader: MessageReader | None = None

    async def apply_all(
        self, conn: AsyncConnection, messages: Sequence[Message], targets: Mapping[str, Table]
    ) -> None:
        """Every message through `reader`, then `apply_batch` (or `apply` one by one)."""
        if not messages:
            return
        with message_spans(
            f"projection {self.name} apply",
            (message.headers for message in messages),
            {"messaging.operation.type": "process", "mercato.projection": self.name},
        ):
            if self.reader is not None:
                messages = [self.reader(message) for message in messages]
            if self.apply_batch is not None and len(messages) > 1:
                await self.apply_batch(conn, messages, targets)
                return
            for message in messages:
                await self.apply(conn, message, targets)

    def __post_init__(self) -> None:
        if not self.name or not self.topics or not self.tables:
            raise ValueError("a projection needs a name, at least one topic and at least one table")


class RebuildIncomplete(RuntimeError):
    """The log no longer starts at offset zero (retention trimmed it): a rebuild would be partial."""


@dataclass(frozen=True, slots=True)
class RebuildReport:
    projection: str
    messages: int
    duration_s: float
    tables: tuple[str, ...]


class Projector:
    """Runs one projection. `run_once` is a `PeriodicJob` callable (messages applied per pass)."""

    def __init__(
        self,
        db: Database,
        projection: Projection,
        *,
        batch_size: int = 500,
        clock: Clock | None = None,
        hook: ProjectionHook | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._db = db
        self.projection = projection
        self.batch_size = batch_size
        self._clock = clock or SystemClock()
        self._hook = hook or NullProjectionHook()
        self._live = {t.name: t for t in projection.tables}
        # Rotates the first partition of a pass, so one busy partition cannot starve the others.
        self._next_start = 0
        self._probe = probe_statement(len(projection.topics))
        topics = projection.topics
        self._probe_params = {"name": projection.name} | {f"topic{n}": t for n, t in enumerate(topics)}
        self._reads = DriverReads(db)

    @property
    def name(self) -> str:
        return self.projection.name

    # ---- live ----------------------------------------------------------------------------------

    async def run_once(self) -> int:
        # An idle pass is one read and no transaction: it must not take the (SQLite: single)
        # write lock every poll.
        heads, done = await self._heads_and_positions()
        if self._report_lag(heads, done) == 0:
            return 0
        # The ranges are cut from the probe's heads and positions: a head that grew since is the
        # next pass's work, and a position another projector moved since is its (see `_advance`).
        seen = {key: done.get(key, 0) for key in heads}
        ranges = cut_ranges(seen, heads, self.batch_size, self._next_start)
        self._next_start += 1
        async with self._db.write() as conn:
            if not ranges.keys() <= done.keys():
                await self._create_checkpoints(conn, [key for key in ranges if key not in done])
            owned = await self._advance(conn, ranges)
            applied = await self._apply_ranges(conn, owned, self._live)
        if applied:
            self._hook.applied(projection=self.name, messages=applied)
        self._report_lag(heads, seen | {key: until for key, (_, until) in owned.items()})
        return applied

    async def lag(self) -> int:
        """Messages on the projection's topics not applied yet; also reported to the hook."""
        return self._report_lag(*await self._heads_and_positions())

    async def _heads_and_positions(self) -> tuple[dict[_Key, int], dict[_Key, int]]:
        heads: dict[_Key, int] = {}
        done: dict[_Key, int] = {}
        for topic, partition, head, position in await self._reads.rows(self._probe, self._probe_params):
            key = (str(topic), int(partition))
            heads[key] = int(head)
            if position is not None:
                done[key] = int(position)
        return heads, done

    def _report_lag(self, heads: Mapping[_Key, int], done: Mapping[_Key, int]) -> int:
        behind = sum(max(head - done.get(key, 0), 0) for key, head in heads.items())
        self._hook.lag(projection=self.name, messages=behind)
        return behind

    async def positions(self) -> dict[_Key, int]:
        """The checkpoint: (topic, partition) -> offset of the next message to apply."""
        async with self._db.read() as conn:
            return await self._positions(conn)

    # ---- rebuild -------------------------------------------------------------------------------

    async def rebuild(self) -> RebuildReport:
        """Replay the whole log into fresh tables and swap them in atomically (see module doc).

        Refuses (`RebuildIncomplete`) when retention trimmed the start of the log: a replay would
        silently leave out the oldest events (`kit.messaging.retention`, ADR 0023)."""
        await self._check_log_complete()
        started = time.perf_counter()
        copies = await self._fresh_copies()
        positions: dict[_Key, int] = {}
        total = 0
        try:
            # Bulk of the replay: short transactions, the live projector keeps running meanwhile.
            while True:
                async with self._db.write() as conn:
                    heads = await self._heads(conn)
                    for key in heads:
                        positions.setdefault(key, 0)
                    applied, moved = await self._apply_batch(conn, positions, heads, copies, self.batch_size)
                positions.update(moved)
                total += applied
                if applied < self.batch_size:
                    break
            async with self._db.write() as conn:
                heads = await self._heads(conn)
                await self._lock_checkpoint(conn, heads)
                for key in heads:
                    positions.setdefault(key, 0)
                # Under the checkpoint lock: catch up with whatever arrived during the replay.
                while True:
                    applied, moved = await self._apply_batch(conn, positions, heads, copies, self.batch_size)
                    positions.update(moved)
                    total += applied
                    if applied == 0:
                        break
                await self._swap_in(conn, copies)
                await self._save(conn, positions)
        except BaseException:
            await self._drop_copies(copies)
            raise
        report = self._rebuilt(total, started)
        await self.lag()
        return report

    async def _check_log_complete(self) -> None:
        log = stream_log.c
        async with self._db.read() as conn:
            starts = await conn.execute(
                select(log.topic, log.partition, func.min(log.offset))
                .where(log.topic.in_(self.projection.topics))
                .group_by(log.topic, log.partition)
            )
            trimmed = [f"{t}/{p} starts at {o}" for t, p, o in starts if o is not None and int(o) > 0]
        if trimmed:
            raise RebuildIncomplete(
                f"cannot rebuild {self.name}: the log was trimmed ({', '.join(sorted(trimmed))}); "
                "a replay would leave out the events before"
            )

    async def _fresh_copies(self) -> dict[str, Table]:
        copies = {name: _copy(table) for name, table in self._live.items()}
        async with self._db.write() as conn:
            for copy in copies.values():
                # A copy left by a rebuild that crashed is stale: start it over.
                await conn.run_sync(copy.drop, checkfirst=True)
                await conn.run_sync(copy.create)
        return copies

    async def _swap_in(self, conn: AsyncConnection, copies: Mapping[str, Table]) -> None:
        for name, table in self._live.items():
            await _swap(conn, table, copies[name])

    def _rebuilt(self, messages: int, started: float) -> RebuildReport:
        duration = time.perf_counter() - started
        self._hook.rebuilt(projection=self.name, messages=messages, duration_s=duration)
        rounded = round(duration, 3)
        _log.info("projection_rebuilt", projection=self.name, messages=messages, duration_s=rounded)
        return RebuildReport(self.name, messages, duration, tuple(self._live))

    async def _drop_copies(self, copies: Mapping[str, Table]) -> None:
        try:
            async with self._db.write() as conn:
                for copy in copies.values():
                    await conn.run_sync(copy.drop, checkfirst=True)
        except Exception:  # noqa: BLE001 - the original failure is the one worth raising
            _log.warning("projection_rebuild_cleanup_failed", projection=self.name)

    # ---- internals -----------------------------------------------------------------------------

    async def _heads(self, conn: AsyncConnection) -> dict[_Key, int]:
        h = stream_heads.c
        rows = await conn.execute(
            select(h.topic, h.partition, h.next_offset).where(h.topic.in_(self.projection.topics))
        )
        return {(str(t), int(p)): int(n) for t, p, n in rows}

    async def _positions(self, conn: AsyncConnection) -> dict[_Key, int]:
        c = projection_checkpoints.c
        rows = await conn.execute(select(c.topic, c.partition, c.position).where(c.name == self.name))
        return {(str(t), int(p)): int(n) for t, p, n in rows}

    async def _create_checkpoints(self, conn: AsyncConnection, keys: Sequence[_Key]) -> None:
        """Checkpoint rows at position 0 for partitions that have none yet (rows are never deleted);
        one a concurrent pass inserted first is left as it is."""
        now = self._clock.now()
        await on_connection(conn).insert_ignore(
            projection_checkpoints,
            [
                {"name": self.name, "topic": t, "partition": p, "position": 0, "updated_at": now}
                for t, p in sorted(keys)
            ],
            conflict=["name", "topic", "partition"],
        )

    async def _lock_checkpoint(
        self, conn: AsyncConnection, heads: Mapping[_Key, int], *, create: bool = True
    ) -> dict[_Key, int]:
        """The checkpoint rows, locked until commit: a second projector of the same projection
        (another worker, or a rebuild's swap) waits here, then reads the advanced positions.
        `create=False` when the caller just saw a row for every key in `heads` (rows are never
        deleted), which saves the insert."""
        if create:
            await self._create_checkpoints(conn, list(heads))
        rows = await on_connection(conn).rows(LOCK_CHECKPOINT, {"name": self.name})
        return {(str(t), int(p)): int(n) for t, p, n in rows}

    async def _advance(
        self, conn: AsyncConnection, ranges: Mapping[_Key, tuple[int, int]]
    ) -> dict[_Key, tuple[int, int]]:
        """Move each range's checkpoint from its start to its end where it still is at the start,
        in one statement (a compare-and-set that locks the rows it moves until commit): the ranges
        this pass owns. The effect is applied in the same transaction, so position and effect
        commit together or not at all, as with the lock-then-save this replaces (two statements)."""
        if not ranges:
            return {}
        params: dict[str, Any] = {"name": self.name, "now": self._clock.now()}
        for n, ((topic, partition), (start, until)) in enumerate(_padded(ranges)):
            params |= {f"t{n}": topic, f"p{n}": partition, f"o{n}": start, f"n{n}": until}
        rows = await on_connection(conn).rows(advance_statement(size_class(len(ranges))), params)
        return {(str(t), int(p)): ranges[(str(t), int(p))] for t, p, _ in rows}

    async def _apply_ranges(
        self, conn: AsyncConnection, ranges: Mapping[_Key, tuple[int, int]], targets: Mapping[str, Table]
    ) -> int:
        """Read every range in one statement and apply the messages, each partition's in offset
        order; how many."""
        if not ranges:
            return 0
        params: dict[str, Any] = {}
        for n, ((topic, partition), (start, until)) in enumerate(_padded(ranges)):
            params |= {f"t{n}": topic, f"p{n}": partition, f"f{n}": start, f"u{n}": until}
        rows = await on_connection(conn).rows(read_ranges_statement(size_class(len(ranges))), params)
        rows.sort(key=lambda row: (row[0], row[1], row[2]))
        expected = sum(until - start for start, until in ranges.values())
        if len(rows) != expected:
            # Only retention trimming below a checkpoint can leave a range short (offsets are dense
            # and committed below the head): what is gone cannot be applied; the rest is.
            _log.warning("projection_range_short", projection=self.name, expected=expected, read=len(rows))
        await self.projection.apply_all(conn, [Message.from_json(row[3]) for row in rows], targets)
        return len(rows)

    async def _apply_batch(
        self,
        conn: AsyncConnection,
        positions: Mapping[_Key, int],
        heads: Mapping[_Key, int],
        targets: Mapping[str, Table],
        limit: int,
    ) -> tuple[int, dict[_Key, int]]:
        """Apply up to `limit` messages past `positions` (the rebuild's, whose checkpoint is its
        own); returns (count, positions moved)."""
        ranges = cut_ranges(positions, heads, limit, self._next_start)
        self._next_start += 1
        applied = await self._apply_ranges(conn, ranges, targets)
        return applied, {key: until for key, (_, until) in ranges.items()}

    async def _save(self, conn: AsyncConnection, positions: Mapping[_Key, int]) -> None:
        if not positions:
            return
        now = self._clock.now()
        # Every moved position in one executemany of one prepared upsert (one round trip on
        # asyncpg), however many partitions the batch touched.
        await on_connection(conn).run(
            SAVE_CHECKPOINT,
            [
                {"name": self.name, "topic": t, "partition": p, "position": position, "updated_at": now}
                for (t, p), position in sorted(positions.items())
            ],
        )


def _padded(ranges: Mapping[_Key, tuple[int, int]]) -> list[tuple[_Key, tuple[int, int]]]:
    """The ranges in key order, padded up to their size class with empty ranges of a partition no
    stream has (topic "", partition -1): they match no checkpoint and no log row, and the statements
    are prepared for five sizes (1, 2, 4, 8, 16) rather than for every partition count."""
    items = sorted(ranges.items())
    return items + [(("", -1 - n), (0, 0)) for n in range(size_class(len(items)) - len(items))]


def _copy(table: Table) -> Table:
    """Same columns and primary key under `<name>__rebuild`; no indexes while loading (faster,
    and index names are database-wide, so the live table's would collide)."""
    copy = table.to_metadata(
        MetaData(naming_convention=table.metadata.naming_convention), name=table.name + REBUILD_SUFFIX
    )
    copy.indexes.clear()
    # Named constraints (the naming convention names them at definition) would collide with the
    # live table's on PostgreSQL, where constraint-backed index names are schema-wide.
    for constraint in copy.constraints:
        if isinstance(constraint.name, str) and table.name in constraint.name:
            constraint.name = conv(constraint.name.replace(table.name, copy.name))
    return copy


async def _swap(conn: AsyncConnection, live: Table, copy: Table) -> None:
    quote = conn.dialect.identifier_preparer.quote
    old = live.name + _OLD_SUFFIX
    await conn.execute(text(f"ALTER TABLE {quote(live.name)} RENAME TO {quote(old)}"))
    await conn.execute(text(f"ALTER TABLE {quote(copy.name)} RENAME TO {quote(live.name)}"))
    await conn.execute(text(f"DROP TABLE {quote(old)}"))
    if conn.dialect.name == "postgresql":
        # PostgreSQL constraint names are schema objects (the primary key's index too): give the
        # swapped-in table its canonical ones back, so later migrations find them by name.
        names = await conn.execute(
            text("SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass)"),
            {"t": quote(live.name)},
        )
        for (name,) in names.all():
            if copy.name in name:
                await conn.execute(
                    text(
                        f"ALTER TABLE {quote(live.name)} RENAME CONSTRAINT {quote(name)} "
                        f"TO {quote(name.replace(copy.name, live.name))}"
                    )
                )
    for index in live.indexes:
        await conn.run_sync(_create_index, index)


def _create_index(sync_conn: Any, index: Any) -> None:
    index.create(sync_conn)
