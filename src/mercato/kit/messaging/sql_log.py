"""`SqlLogStream`: the `Stream` port on the application's own database (embedded mode).

A partitioned append-only log table, one cursor row per (group, topic, partition) and a small
per-offset table of failures and out-of-order acks. No broker to run; the price is that every
read and ack is a database write.

Appends lock the partition's head row, so offsets within a partition commit in offset order and a
reader never acknowledges past a gap that a slower publisher fills later. A group has at most one
batch out per partition: the next batch starts after the previous one is acknowledged, or after its
visibility deadline (a dead consumer), so a partition is consumed in order even across redeliveries.

Throughput (ADR 0018): the common read and publish run their prepared Core statements on the
driver's connection (one aiosqlite thread hop or asyncpg round trip each, where SQLAlchemy's async
adapter costs several), and anything uncommon (a group's first read, an expired batch, a replayed
dead letter) rolls back and runs again through SQLAlchemy. A publish is three statements whatever
its partitions (one upsert reserves every head's offsets, one dedup lookup, one append). A poll
first runs one autocommitted probe and opens no transaction when there is nothing to take; a take
is three statements whatever its partitions (lock the cursors, read every batch, move every
cursor; ADR 0073). The common ack, each partition's run acknowledged in order by its holder, is
one autocommitted conditional UPDATE for all partitions; any other ack takes the general, locking
path. Driver-path statements bypass SQLAlchemy's engine events: `add_driver_listener` sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ClauseElement, update

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook
from mercato.kit.messaging.message import Message
from mercato.kit.messaging.sql_log_cursors import (
    ack_runs,
    advance,
    cursor_key,
    deliveries_of,
    lock_cursor,
    mark_acked,
    partition_batches,
    rewind,
)
from mercato.kit.messaging.sql_log_dead_letters import SqlDeadLetters
from mercato.kit.messaging.sql_log_statements import (
    _ACK_IN_ORDER,
    _APPEND,
    _LAG,
    _LOCK_CURSORS,
    _MOVE_HEAD,
    _PROBE,
    _STORED_IDS_CHUNK,
    _acks_in_order,
    _allocate_heads,
    _next_batches,
    _Probe,
    _set_cursors,
    _stored_ids,
)
from mercato.kit.messaging.stream import (
    DEAD_LETTER_RECEIPT_PREFIX,
    STREAM_CHANNEL,
    DeadLetter,
    Delivery,
    check_replay_start,
)
from mercato.kit.messaging.tables import stream_cursors
from mercato.kit.storage import Database
from mercato.kit.storage.statements import (
    DriverReads,
    Executor,
    SharedDriverConnection,
    SqlAlchemyExecutor,
    Statements,
    Unprepared,
    add_driver_listener,
    autocommit_rows,
    driver_prepared,
    driver_transaction,
    observe,
)
from mercato.kit.storage.statements_in_tx import on_connection

__all__ = ["DriverReads", "SqlLogStream", "add_driver_listener", "driver_prepared"]

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX
_T = TypeVar("_T")
_S = TypeVar("_S", bound=ClauseElement)
_Batches = list[tuple[tuple[str, int], list[Message]]]


class SqlLogStream:
    """The embedded stream. Configuration applies to every topic and group it serves.

    `partitions` must stay fixed for a topic's life: changing it moves keys between partitions.
    A message's `attempt` grows when a consumer nacks it or when its batch's visibility deadline
    (`visibility_timeout_s`) passes while it is the first unacknowledged offset of its partition;
    at `max_attempts` failures it is dead-lettered. After a nack the partition pauses
    `retry_delay_s` before redelivering.
    """

    def __init__(
        self,
        db: Database,
        *,
        partitions: int = 8,
        visibility_timeout_s: float = 30.0,
        max_attempts: int = 5,
        retry_delay_s: float = 0.0,
        poll_interval_s: float = 0.2,
        clock: Clock | None = None,
        hook: MessagingHook | None = None,
        topic_signals: Mapping[str, str] | None = None,
    ) -> None:
        """`topic_signals`: topic -> the work signal its publishes fire in this process instead of
        `STREAM_CHANNEL`, for a topic whose consumers wait on a signal of their own (a chat send
        woke the order feed, and every other loop waiting on the shared one, for nothing)."""
        if partitions < 1 or max_attempts < 1 or visibility_timeout_s <= 0:
            raise ValueError("partitions and max_attempts must be >= 1, visibility_timeout_s > 0")
        self._db = db
        self.partitions = partitions
        self.visibility_timeout_s = visibility_timeout_s
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.poll_interval_s = poll_interval_s
        self._clock = clock or SystemClock()
        self._hook = hook or NullMessagingHook()
        self._topic_signals = dict(topic_signals or {})
        # Rotates the partition a read starts at, so a small max_messages does not starve the rest.
        self._next_start = 0
        self._statements = Statements(db.engine.dialect)
        self._ack_connection = SharedDriverConnection(db)
        self._dead = SqlDeadLetters(db, self._clock, self._hook)
        # Set by every publish through this instance: a blocking read of this process wakes at
        # once instead of sleeping out its poll interval. One per event loop: an instance may
        # outlive a loop (tests, CLI commands run in turn) and an Event binds to the first.
        self._wakeups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
            weakref.WeakKeyDictionary()
        )

    def _published(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        event = self._wakeups.get(loop)
        if event is None:
            event = self._wakeups[loop] = asyncio.Event()
        return event

    async def _transaction(self, work: Callable[[Executor], Awaitable[_T]]) -> _T:
        """`work` in one write transaction on the driver path; when it needs a statement that path
        does not carry (a group's first read, an expired batch, a replayed dead letter), rolled back
        and run again from the start through SQLAlchemy."""
        try:
            async with driver_transaction(self._db, self._statements) as executor:
                return await work(executor)
        except Unprepared:
            pass
        async with self._db.write() as conn:
            return await work(SqlAlchemyExecutor(conn))

    # ---- publishing ----------------------------------------------------------------------------

    @property
    def database(self) -> Database:
        """The database the log lives in (see `publish_claimed`)."""
        return self._db

    async def publish(self, messages: Sequence[Message]) -> None:
        batches = partition_batches(messages, self.partitions)
        if not batches:
            return
        now = self._clock.now()

        async def append_all(executor: Executor) -> None:
            await self._append(executor, batches, now)

        await self._transaction(append_all)
        self._appended(batches)

    async def publish_claimed(
        self, claim: Callable[[Executor], Awaitable[Sequence[Message]]]
    ) -> list[Message]:
        """Append what `claim` (a write of the caller's on this database: the outbox relay's claim
        that marks its rows published, ADR 0083) returns in its transaction, committed as one;
        redone from the start with the transaction (`_transaction`). Returns what was appended."""
        now = self._clock.now()

        async def claim_and_append(executor: Executor) -> tuple[list[Message], _Batches]:
            messages = list(await claim(executor))
            batches = partition_batches(messages, self.partitions)
            if batches:
                await self._append(executor, batches, now)
            return messages, batches

        messages, batches = await self._transaction(claim_and_append)
        if batches:
            self._appended(batches)
        return messages

    def _appended(self, batches: _Batches) -> None:
        """An append committed: wake this process's readers."""
        self._published().set()
        self._db.signals.fire(*{self._topic_signals.get(t, STREAM_CHANNEL) for (t, _p), _ in batches})

    async def _append(self, executor: Executor, batches: _Batches, now: datetime) -> None:
        """Every partition's batch in three statements, however many partitions: reserve the
        offsets (locking the heads), find the ids already stored, insert the new rows."""
        params: dict[str, Any] = {}
        for n, ((topic, partition), batch) in enumerate(batches):
            params.update({f"t{n}": topic, f"p{n}": partition, f"n{n}": len(batch)})
        heads = {
            (str(topic), int(partition)): int(head)
            for topic, partition, head in await executor.rows(
                _allocate_heads(self._db.dialect, len(batches)), params
            )
        }
        # Checked under the head locks: a duplicate of the same message hashes to the same
        # partition, so a concurrent publisher of it waits above and then sees it here.
        ids = [m.id for _, batch in batches for m in batch]
        stored: set[uuid.UUID] = set()
        for start in range(0, len(ids), _STORED_IDS_CHUNK):
            chunk = ids[start : start + _STORED_IDS_CHUNK]
            found = await executor.rows(_stored_ids(len(chunk)), {f"id{n}": i for n, i in enumerate(chunk)})
            stored.update(row[0] for row in found)
        rows: list[dict[str, Any]] = []
        for (topic, partition), batch in batches:
            first = heads[(topic, partition)] - len(batch)
            fresh = [m for m in batch if m.id not in stored]
            rows.extend(
                {
                    "topic": topic,
                    "partition": partition,
                    "offset": first + n,
                    "message_id": message.id,
                    "key": message.key,
                    "envelope": message.to_json(),
                    "appended_at": now,
                }
                for n, message in enumerate(fresh)
            )
            if len(fresh) < len(batch):
                # Offsets were reserved for the duplicates too: hand them back, or the partition
                # would have a gap no consumer's watermark could step over. Rare (a relay retry).
                await executor.run(
                    _MOVE_HEAD,
                    {"b_topic": topic, "b_partition": partition, "next_offset_value": first + len(fresh)},
                )
        if rows:
            await executor.run(_APPEND, rows)

    # ---- consuming -----------------------------------------------------------------------------

    async def read(
        self, topic: str, group: str, consumer: str, *, max_messages: int, block_s: float
    ) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_s
        while True:
            # Cleared before the look, so a publish landing after it wakes the wait below.
            self._published().clear()
            deliveries = await self._read_once(topic, group, consumer, max_messages)
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0:
                return deliveries
            # Woken at once by a publish from this process; other processes' are polled for.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.poll_interval_s, remaining)):
                    await self._published().wait()

    async def _read_once(self, topic: str, group: str, consumer: str, max_messages: int) -> list[Delivery]:
        now = self._clock.now()
        probe = await self._probe(topic, group, now)
        if probe is None:
            return []
        lease_until = now + timedelta(seconds=self.visibility_timeout_s)

        async def take(executor: Executor) -> list[Delivery]:
            return await self._take(executor, topic, group, consumer, max_messages, now, lease_until, probe)

        return await self._transaction(take)

    async def _probe(self, topic: str, group: str, now: datetime) -> _Probe | None:
        """One autocommitted statement: None when the group has nothing to take on `topic` (no new
        message, no expired batch, no due replay), so an idle poll opens no transaction; else what
        the read's transaction needs to know. Everything it reports is rechecked under the cursor
        locks, except a head that grew since, which the next poll sees."""
        rows = await autocommit_rows(
            self._ack_connection,
            self._statements,
            _PROBE,
            {"topic": topic, "group": group, "now": now},
            postgresql=self._db.dialect == "postgresql",
        )
        heads: dict[int, int] = {}
        missing: list[int] = []
        work = False
        replays = False
        for partition, head, next_offset, batch_end, lease_until, replays_due in rows:
            heads[int(partition)] = int(head)
            replays = replays or bool(replays_due)
            if next_offset is None:
                missing.append(int(partition))
                work = work or int(head) > 0
            elif lease_until is not None and lease_until > now:
                continue  # a batch out under a live lease, or a nack's pause: not ours yet
            elif batch_end > next_offset or next_offset < head:
                work = True  # an expired batch to settle, or messages to deliver
        if not (work or replays):
            return None
        return _Probe(heads, missing, replays)

    async def _take(
        self,
        executor: Executor,
        topic: str,
        group: str,
        consumer: str,
        max_messages: int,
        now: datetime,
        lease_until: datetime,
        probe: _Probe,
    ) -> list[Delivery]:
        out: list[Delivery] = []
        if probe.replays:
            out = await self._dead.take_replays(
                executor, topic, group, consumer, now, lease_until, max_messages
            )
        if len(out) >= max_messages:
            return out
        heads = probe.heads
        if not heads:
            return out
        if probe.missing:
            await executor.insert_ignore(
                stream_cursors,
                [
                    {"group": group, "topic": topic, "partition": p, "next_offset": 0, "batch_end": 0}
                    for p in probe.missing
                ],
                conflict=["group", "topic", "partition"],
            )
        # SKIP LOCKED: a partition another consumer of the group is reading right now is simply
        # not ours this time; consumers spread over partitions instead of queueing.
        cursors = await executor.rows(_LOCK_CURSORS, {"group": group, "topic": topic})
        start = self._next_start % max(len(cursors), 1)
        self._next_start += 1
        # Every partition's next messages in one statement and every cursor move in one (ADR
        # 0073; were two statements per partition): (partition, first offset) to read, in the
        # rotation's order, and (partition, next, end, owner, lease) to write.
        to_read: list[tuple[int, int]] = []
        moves: list[tuple[int, int, int, str | None, datetime | None]] = []
        settled: set[int] = set()  # partitions whose expired batch was charged an attempt
        for partition, next_offset, batch_end, owner, leased_until in cursors[start:] + cursors[:start]:
            if batch_end > next_offset:
                if leased_until is not None and leased_until > now:
                    continue
                # The batch's deadline passed: its consumer died or stalled. The first
                # unacknowledged message is the likely culprit, so it is charged the attempt.
                error = f"visibility timeout expired (consumer {owner})"
                next_offset = await self._dead.fail(
                    executor,
                    group,
                    topic,
                    partition,
                    next_offset,
                    next_offset,
                    error,
                    max_attempts=self.max_attempts,
                )
                settled.add(partition)
            elif leased_until is not None and leased_until > now:
                continue
            if next_offset < heads.get(partition, 0):
                to_read.append((partition, next_offset))
            elif batch_end != next_offset or leased_until is not None:
                # Caught up. Write only if an expired batch was just settled (or a lapsed pause
                # is cleared): an idle poll must not rewrite every cursor row.
                moves.append((partition, next_offset, next_offset, None, None))
        if to_read and len(out) < max_messages:
            rows = await executor.rows(
                _next_batches(len(to_read)),
                {
                    "group": group,
                    "topic": topic,
                    "limit": max_messages - len(out),
                    **{f"p{i}": p for i, (p, _) in enumerate(to_read)},
                    **{f"from{i}": offset for i, (_, offset) in enumerate(to_read)},
                },
            )
            batches: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
            for row in rows:
                batches[int(row[0])].append(row[1:])
            for partition, next_offset in to_read:
                if len(out) >= max_messages:
                    # Not read this pass: its cursor stays as it was (a settled expiry frees it).
                    if partition in settled:
                        moves.append((partition, next_offset, next_offset, None, None))
                    continue
                batch = sorted(batches[partition], key=lambda row: int(row[0]))
                taken = deliveries_of(
                    topic, group, consumer, partition, batch[: max_messages - len(out)], lease_until
                )
                if taken:
                    out.extend(taken)
                    moves.append((partition, next_offset, taken[-1].offset + 1, consumer, lease_until))
                else:
                    moves.append((partition, next_offset, next_offset, None, None))
        if moves:
            params: dict[str, Any] = {"b_group": group, "b_topic": topic}
            for i, (partition, next_offset, end, owner, lease) in enumerate(moves):
                params.update({f"p{i}": partition, f"n{i}": next_offset, f"e{i}": end, f"o{i}": owner})
                params[f"l{i}"] = lease
            await executor.run(_set_cursors(len(moves)), params)
        return out

    async def ack(self, delivery: Delivery) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._dead.settle(delivery, error=None)
            return
        if await self._ack_in_order(delivery):
            return
        async with self._db.write() as conn:
            cursor = await lock_cursor(conn, delivery)
            if cursor is None:
                return
            await mark_acked(conn, delivery.group, delivery.topic, delivery.partition, delivery.offset)
            advanced = await advance(
                SqlAlchemyExecutor(conn),
                delivery.group,
                delivery.topic,
                delivery.partition,
                cursor.next_offset,
            )
            done = advanced >= cursor.batch_end
            lease_until = None if done else cursor.lease_until
            if lease_until is not None and advanced <= delivery.offset:
                # This ack stays recorded above the watermark. On PostgreSQL an in-order ack of the
                # batch waiting for our row lock rechecks the cursor row when we commit but not the
                # attempts table (its subquery keeps its snapshot): it would step the watermark onto
                # this acknowledged offset and leave it there. It also requires the lease its
                # delivery was made under, so moving the deadline by a microsecond turns it (and the
                # batch's later in-order acks) to this path, which sees our ack.
                lease_until += timedelta(microseconds=1)
            await conn.execute(
                update(stream_cursors)
                .where(*cursor_key(delivery))
                .values(
                    next_offset=advanced,
                    batch_end=advanced if done else cursor.batch_end,
                    lease_until=lease_until,
                )
            )

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Each partition's run of consecutive offsets acknowledged in order, every partition's in
        one autocommitted statement (ADR 0073; was one per partition); the rest as `ack` does."""
        for delivery in await self.ack_in_order_runs(deliveries):
            await self.ack(delivery)

    async def ack_in_order_runs(self, deliveries: Sequence[Delivery], conn: Any = None) -> list[Delivery]:
        """`ack_many`'s in-order runs, autocommitted, or with `conn` in its write transaction on this
        database (the consumer's: they commit with its effects, ADR 0083); the deliveries left."""
        in_order, general = ack_runs(deliveries)
        for (topic, group, consumer), by_partition in in_order.items():
            moved = await self._acks_in_order(topic, group, consumer, list(by_partition.values()), conn)
            general.extend(run for partition, run in by_partition.items() if partition not in moved)
        return [delivery for run in general for delivery in run]

    async def _acks_in_order(
        self, topic: str, group: str, consumer: str, runs: list[list[Delivery]], conn: Any
    ) -> set[int]:
        """`_ack_in_order` of each run (one per partition, its deliveries in offset order) in one
        statement (autocommitted, or in `conn`'s transaction): the partitions whose watermark it
        moved past their run."""
        params: dict[str, Any] = {"b_group": group, "b_topic": topic, "b_owner": consumer}
        for i, run in enumerate(runs):
            params.update({f"p{i}": run[0].partition, f"f{i}": run[0].offset, f"n{i}": run[-1].offset + 1})
            params[f"l{i}"] = datetime.fromisoformat(run[0].receipt)
        if conn is not None:
            return {int(row[0]) for row in await on_connection(conn).rows(_acks_in_order(len(runs)), params)}
        statement = self._statements.get(_acks_in_order(len(runs)))
        args = statement.args(params)
        async with self._ack_connection.use() as driver:
            observe(statement.sql)
            if self._db.dialect == "postgresql":
                records = await driver.fetch(statement.sql, *args)
            else:
                records = await driver.execute_fetchall(statement.sql, args)
        return {int(record[0]) for record in records}

    async def _ack_in_order(self, delivery: Delivery, *, through: int | None = None) -> bool:
        """The common ack, in one autocommitted statement: `delivery` is the first unacknowledged
        offset of the batch its consumer still holds under the same lease (its receipt), and no
        failure or out-of-order ack is recorded at or after it, so acknowledging it is moving the
        watermark by one (with `through`: past that later offset of the same batch, every offset
        between handled too). False when any of that does not hold (or the ack is stale): the caller
        takes the general path, which decides.

        Sent on the driver's own connection, outside SQLAlchemy's execution layer: at one
        statement per message its per-statement cost was most of the ack's time (see
        docs/decisions/0018-sql-log-driver-hot-path.md)."""
        if not delivery.receipt:
            return False
        statement = self._statements.get(_ACK_IN_ORDER)
        args = statement.args(
            {
                "b_group": delivery.group,
                "b_topic": delivery.topic,
                "b_partition": delivery.partition,
                "b_offset": delivery.offset,
                "b_owner": delivery.consumer,
                "b_next": (delivery.offset if through is None else through) + 1,
                "b_lease": datetime.fromisoformat(delivery.receipt),
            }
        )
        async with self._ack_connection.use() as driver:
            observe(statement.sql)
            if self._db.dialect == "postgresql":
                return await driver.fetchval(statement.sql, *args) is not None
            return bool(await driver.execute_fetchall(statement.sql, args))

    async def nack(self, delivery: Delivery, *, error: str) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._dead.settle(delivery, error=error)
            return
        async with self._db.write() as conn:
            cursor = await lock_cursor(conn, delivery)
            if cursor is None:
                return
            advanced = await self._dead.fail(
                SqlAlchemyExecutor(conn),
                delivery.group,
                delivery.topic,
                delivery.partition,
                cursor.next_offset,
                delivery.offset,
                error,
                max_attempts=self.max_attempts,
            )
            # Rewind to the first unacknowledged offset: the rest of the batch is revoked and comes
            # again after this message, keeping the partition's order.
            resume_at = self._clock.now() + timedelta(seconds=self.retry_delay_s)
            await conn.execute(
                update(stream_cursors)
                .where(*cursor_key(delivery))
                .values(next_offset=advanced, batch_end=advanced, lease_until=resume_at)
            )

    # ---- dead letters (sql_log_dead_letters.py) ----------------------------------------------------

    async def dead_letters(
        self, *, topic: str | None = None, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        return await self._dead.list(topic=topic, group=group, limit=limit)

    async def dead_letter(self, dead_letter_id: uuid.UUID) -> DeadLetter | None:
        return await self._dead.get(dead_letter_id)

    async def replay_dead_letters(
        self, *, ids: Sequence[uuid.UUID] | None = None, topic: str | None = None
    ) -> int:
        return await self._dead.replay(ids=ids, topic=topic)

    # ---- replay and lag ------------------------------------------------------------------------

    async def replay(
        self,
        topic: str,
        group: str,
        *,
        from_offset: int | None = None,
        from_time: datetime | None = None,
        partition: int | None = None,
    ) -> None:
        check_replay_start(from_offset, from_time)
        async with self._db.write() as conn:
            await rewind(
                conn, topic, group, from_offset=from_offset, from_time=from_time, partition=partition
            )

    async def lag(self, topic: str, group: str) -> int:
        [(behind,)] = await autocommit_rows(
            self._ack_connection,
            self._statements,
            _LAG,
            {"topic": topic, "group": group},
            postgresql=self._db.dialect == "postgresql",
        )
        return int(behind)
