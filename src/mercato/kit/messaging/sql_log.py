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
first runs one autocommitted probe and opens no transaction when there is nothing to take. The
common ack, the first unacknowledged offset of the batch acknowledged by its holder, is one
autocommitted conditional UPDATE; any other ack takes the general, locking path. Statements on
the driver path bypass SQLAlchemy's engine events: `add_driver_listener` observes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    BigInteger,
    ClauseElement,
    Insert,
    Integer,
    Select,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    null,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.ids import new_id
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook
from mercato.kit.messaging.message import Message, partition_for
from mercato.kit.messaging.stream import (
    DEAD_LETTER_RECEIPT_PREFIX,
    STREAM_CHANNEL,
    DeadLetter,
    DeadLetterStatus,
    Delivery,
    check_replay_start,
)
from mercato.kit.messaging.tables import (
    dead_letters,
    stream_attempts,
    stream_cursors,
    stream_heads,
    stream_log,
)
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
    insert_ignore,
    observe,
)

# The statement layer's names stay importable from here (kit/storage/statements.py is their home).
__all__ = ["DriverReads", "SqlLogStream", "add_driver_listener", "driver_prepared", "insert_ignore"]

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX
_T = TypeVar("_T")
_S = TypeVar("_S", bound=ClauseElement)


# The statements of every publish and read, built once: SQLAlchemy then reuses their compiled
# form without rebuilding the expression and its cache key per call.
_h, _c, _log, _a = stream_heads.c, stream_cursors.c, stream_log.c, stream_attempts.c

_MOVE_HEAD = (
    update(stream_heads)
    .where(_h.topic == bindparam("b_topic"), _h.partition == bindparam("b_partition"))
    .values(next_offset=bindparam("next_offset_value"))
)
_APPEND = insert(stream_log)
_STORED_IDS_CHUNK = 100

# The poll's first, autocommitted look (no transaction): every partition's head next to the group's
# cursor, and whether a replayed dead letter is due. Most polls of an idle group end here.
_PROBE = (
    select(
        _h.partition,
        _h.next_offset,
        _c.next_offset,
        _c.batch_end,
        _c.lease_until,
        exists()
        .where(
            dead_letters.c.group == bindparam("group"),
            dead_letters.c.topic == bindparam("topic"),
            dead_letters.c.status == DeadLetterStatus.REPLAYING.value,
            dead_letters.c.visible_at.is_(None) | (dead_letters.c.visible_at <= bindparam("now")),
        )
        .label("replays_due"),
    )
    .select_from(
        stream_heads.outerjoin(
            stream_cursors,
            and_(_c.group == bindparam("group"), _c.topic == _h.topic, _c.partition == _h.partition),
        )
    )
    .where(_h.topic == bindparam("topic"))
)
_done = func.coalesce(_c.next_offset, 0)
_LAG = (
    select(func.coalesce(func.sum(case((_h.next_offset > _done, _h.next_offset - _done), else_=0)), 0))
    .select_from(
        stream_heads.outerjoin(
            stream_cursors,
            and_(_c.group == bindparam("group"), _c.topic == _h.topic, _c.partition == _h.partition),
        )
    )
    .where(_h.topic == bindparam("topic"))
)

_LOCK_CURSORS = (
    select(_c.partition, _c.next_offset, _c.batch_end, _c.owner, _c.lease_until)
    .where(_c.group == bindparam("group"), _c.topic == bindparam("topic"))
    .order_by(_c.partition)
    .with_for_update(skip_locked=True)
)
# The next messages of a partition with the group's record of each (none for most).
_NEXT_BATCH = (
    select(_log.offset, _log.envelope, _a.failures, _a.acked)
    .select_from(
        stream_log.outerjoin(
            stream_attempts,
            and_(
                _a.group == bindparam("group"),
                _a.topic == _log.topic,
                _a.partition == _log.partition,
                _a.offset == _log.offset,
            ),
        )
    )
    .where(
        _log.topic == bindparam("topic"),
        _log.partition == bindparam("partition"),
        _log.offset >= bindparam("from_offset"),
    )
    .order_by(_log.offset)
    .limit(bindparam("limit"))
)
_d = dead_letters.c
# Dead letters queued for the group again whose (re)delivery is due.
_REPLAYS = (
    select(_d.id, _d.partition, _d.offset, _d.envelope, _d.attempts)
    .where(
        _d.group == bindparam("group"),
        _d.topic == bindparam("topic"),
        _d.status == DeadLetterStatus.REPLAYING.value,
        _d.visible_at.is_(None) | (_d.visible_at <= bindparam("now")),
    )
    .order_by(_d.id)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_SET_CURSOR = (
    update(stream_cursors)
    .where(
        _c.group == bindparam("b_group"),
        _c.topic == bindparam("b_topic"),
        _c.partition == bindparam("b_partition"),
    )
    .values(
        next_offset=bindparam("next_offset_value"),
        batch_end=bindparam("batch_end_value"),
        owner=bindparam("owner_value"),
        lease_until=bindparam("lease_until_value"),
    )
)


class _Probe(NamedTuple):
    heads: dict[int, int]
    # Partitions the group has no cursor for yet.
    missing: list[int]
    replays: bool


class _Cursor(NamedTuple):
    next_offset: int
    batch_end: int
    lease_until: datetime | None


# The in-order ack (see `SqlLogStream._ack_in_order`). Both engines evaluate SET expressions on
# the row's old values, so `lease_until` is cleared exactly when this ack completes the batch (its
# end is the new watermark).
_ACK_IN_ORDER = (
    update(stream_cursors)
    .where(
        _c.group == bindparam("b_group"),
        _c.topic == bindparam("b_topic"),
        _c.partition == bindparam("b_partition"),
        _c.next_offset == bindparam("b_offset"),
        _c.batch_end > bindparam("b_offset"),
        _c.owner == bindparam("b_owner"),
        _c.lease_until == bindparam("b_lease"),
        ~exists().where(
            _a.group == bindparam("b_group"),
            _a.topic == bindparam("b_topic"),
            _a.partition == bindparam("b_partition"),
            _a.offset >= bindparam("b_offset"),
        ),
    )
    .values(
        next_offset=bindparam("b_next"),
        lease_until=case((_c.batch_end == bindparam("b_next"), null()), else_=_c.lease_until),
    )
    .returning(_c.next_offset)
)


_STORED_IDS_STATEMENTS: dict[int, Select[tuple[uuid.UUID]]] = {}
_ALLOCATE_STATEMENTS: dict[tuple[str, int], Insert] = {}


def _allocate_heads(dialect: str, count: int) -> Insert:
    """Reserve offsets on `count` partitions in one statement: each head (`t0`, `p0`, `n0`...) moves
    by its batch's size, created at that size if new, and comes back as the new head.

    The upsert takes the head rows' locks as a SELECT ... FOR UPDATE did, in VALUES order (the
    caller sorts the partitions, so concurrent publishers lock in one order and cannot deadlock),
    and holds them to commit: offsets of a partition still commit in offset order."""
    statement = _ALLOCATE_STATEMENTS.get((dialect, count))
    if statement is None:
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        values = dialect_insert(stream_heads).values(
            [
                {
                    "topic": bindparam(f"t{n}", type_=_h.topic.type),
                    "partition": bindparam(f"p{n}", type_=Integer()),
                    "next_offset": bindparam(f"n{n}", type_=BigInteger()),
                }
                for n in range(count)
            ]
        )
        statement = values.on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={"next_offset": _h.next_offset + values.excluded.next_offset},
        ).returning(_h.topic, _h.partition, _h.next_offset)
        _ALLOCATE_STATEMENTS[(dialect, count)] = statement
        driver_prepared(statement)
    return statement


def _stored_ids(count: int) -> Select[tuple[uuid.UUID]]:
    """Which of `count` message ids (`id0`...) the log holds: one statement per batch size, so its
    compiled form is reused (an expanding IN is rendered anew on every call)."""
    statement = _STORED_IDS_STATEMENTS.get(count)
    if statement is None:
        statement = select(_log.message_id).where(
            _log.message_id.in_([bindparam(f"id{n}", type_=_log.message_id.type) for n in range(count)])
        )
        _STORED_IDS_STATEMENTS[count] = statement
        driver_prepared(statement)
    return statement


for _statement in (
    _MOVE_HEAD,
    _APPEND,
    _PROBE,
    _LAG,
    _LOCK_CURSORS,
    _NEXT_BATCH,
    _REPLAYS,
    _SET_CURSOR,
    _ACK_IN_ORDER,
):
    driver_prepared(_statement)


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
    ) -> None:
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
        # Rotates the partition a read starts at, so a small max_messages does not starve the rest.
        self._next_start = 0
        self._statements = Statements(db.engine.dialect)
        self._ack_connection = SharedDriverConnection(db)
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

    async def publish(self, messages: Sequence[Message]) -> None:
        by_partition: dict[tuple[str, int], dict[uuid.UUID, Message]] = defaultdict(dict)
        for message in messages:
            # A message given twice in one call is stored once (the first time).
            by_partition[(message.topic, partition_for(message.key, partitions=self.partitions))].setdefault(
                message.id, message
            )
        if not by_partition:
            return
        now = self._clock.now()
        # A fixed lock order (topic, partition) keeps concurrent publishers from deadlocking.
        batches = [(key, list(batch.values())) for key, batch in sorted(by_partition.items())]

        async def append_all(executor: Executor) -> None:
            await self._append(executor, batches, now)

        await self._transaction(append_all)
        self._published().set()
        self._db.signals.fire(STREAM_CHANNEL)

    async def _append(
        self,
        executor: Executor,
        batches: list[tuple[tuple[str, int], list[Message]]],
        now: datetime,
    ) -> None:
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
            out = await self._take_replays(executor, topic, group, consumer, now, lease_until, max_messages)
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
        for partition, next_offset, batch_end, owner, leased_until in cursors[start:] + cursors[:start]:
            if len(out) >= max_messages:
                break
            if batch_end > next_offset:
                if leased_until is not None and leased_until > now:
                    continue
                # The batch's deadline passed: its consumer died or stalled. The first
                # unacknowledged message is the likely culprit, so it is charged the attempt.
                error = f"visibility timeout expired (consumer {owner})"
                next_offset = await self._fail(
                    executor, group, topic, partition, next_offset, next_offset, error
                )
            elif leased_until is not None and leased_until > now:
                continue
            if next_offset >= heads.get(partition, 0):
                # Caught up. Write only if an expired batch was just settled: an idle poll
                # must not rewrite every cursor row.
                if (next_offset, batch_end, leased_until) != (next_offset, next_offset, None):
                    await self._set_cursor(
                        executor, group, topic, partition, next_offset, next_offset, None, None
                    )
                continue
            taken = await self._deliver(
                executor,
                topic,
                group,
                consumer,
                partition,
                next_offset,
                max_messages - len(out),
                lease_until,
            )
            if taken:
                out.extend(taken)
                end = taken[-1].offset + 1
                await self._set_cursor(
                    executor, group, topic, partition, next_offset, end, consumer, lease_until
                )
            else:
                await self._set_cursor(
                    executor, group, topic, partition, next_offset, next_offset, None, None
                )
        return out

    async def _deliver(
        self,
        executor: Executor,
        topic: str,
        group: str,
        consumer: str,
        partition: int,
        from_offset: int,
        limit: int,
        lease_until: datetime,
    ) -> list[Delivery]:
        # The batch's claim, which an in-order ack must still match (see `_ack_in_order`).
        receipt = lease_until.isoformat()
        rows = await executor.rows(
            _NEXT_BATCH,
            {
                "group": group,
                "topic": topic,
                "partition": partition,
                "from_offset": from_offset,
                "limit": limit,
            },
        )
        deliveries = []
        for offset, envelope, failures, acked in rows:
            if acked:
                continue
            deliveries.append(
                Delivery(
                    message=Message.from_json(envelope),
                    topic=topic,
                    group=group,
                    consumer=consumer,
                    partition=partition,
                    offset=int(offset),
                    attempt=int(failures or 0) + 1,
                    receipt=receipt,
                )
            )
        return deliveries

    async def ack(self, delivery: Delivery) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._settle_replay(delivery, error=None)
            return
        if await self._ack_in_order(delivery):
            return
        async with self._db.write() as conn:
            cursor = await self._lock_cursor(conn, delivery)
            if cursor is None:
                return
            await self._mark_acked(conn, delivery.group, delivery.topic, delivery.partition, delivery.offset)
            advanced = await self._advance(
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
                .where(*self._cursor_key(delivery))
                .values(
                    next_offset=advanced,
                    batch_end=advanced if done else cursor.batch_end,
                    lease_until=lease_until,
                )
            )

    async def _ack_in_order(self, delivery: Delivery) -> bool:
        """The common ack, in one autocommitted statement: `delivery` is the first unacknowledged
        offset of the batch its consumer still holds under the same lease (its receipt), and no
        failure or out-of-order ack is recorded at or after it, so acknowledging it is moving the
        watermark by one. False when any of that does not hold (or the ack is stale): the caller
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
                "b_next": delivery.offset + 1,
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
            await self._settle_replay(delivery, error=error)
            return
        async with self._db.write() as conn:
            cursor = await self._lock_cursor(conn, delivery)
            if cursor is None:
                return
            advanced = await self._fail(
                SqlAlchemyExecutor(conn),
                delivery.group,
                delivery.topic,
                delivery.partition,
                cursor.next_offset,
                delivery.offset,
                error,
            )
            # Rewind to the first unacknowledged offset: the rest of the batch is revoked and comes
            # again after this message, keeping the partition's order.
            resume_at = self._clock.now() + timedelta(seconds=self.retry_delay_s)
            await conn.execute(
                update(stream_cursors)
                .where(*self._cursor_key(delivery))
                .values(next_offset=advanced, batch_end=advanced, lease_until=resume_at)
            )

    @staticmethod
    def _cursor_key(delivery: Delivery) -> tuple[Any, ...]:
        c = stream_cursors.c
        return (c.group == delivery.group, c.topic == delivery.topic, c.partition == delivery.partition)

    async def _lock_cursor(self, conn: AsyncConnection, delivery: Delivery) -> _Cursor | None:
        """The partition's cursor when `delivery` is still outstanding and its consumer still
        holds the batch; None when it is stale (already acknowledged, revoked by a nack, rewound
        by a replay, or redelivered to another consumer after its visibility deadline)."""
        c = stream_cursors.c
        row = (
            await conn.execute(
                select(c.next_offset, c.batch_end, c.owner, c.lease_until)
                .where(*self._cursor_key(delivery))
                .with_for_update()
            )
        ).first()
        if (
            row is None
            or row.owner != delivery.consumer
            or not int(row.next_offset) <= delivery.offset < int(row.batch_end)
        ):
            return None
        return _Cursor(int(row.next_offset), int(row.batch_end), row.lease_until)

    async def _set_cursor(
        self,
        executor: Executor,
        group: str,
        topic: str,
        partition: int,
        next_offset: int,
        batch_end: int,
        owner: str | None,
        lease_until: datetime | None,
    ) -> None:
        await executor.run(
            _SET_CURSOR,
            {
                "b_group": group,
                "b_topic": topic,
                "b_partition": partition,
                "next_offset_value": next_offset,
                "batch_end_value": batch_end,
                "owner_value": owner,
                "lease_until_value": lease_until,
            },
        )

    async def _mark_acked(
        self, conn: AsyncConnection, group: str, topic: str, partition: int, offset: int
    ) -> None:
        a = stream_attempts.c
        await insert_ignore(
            conn,
            stream_attempts,
            [
                {
                    "group": group,
                    "topic": topic,
                    "partition": partition,
                    "offset": offset,
                    "failures": 0,
                    "acked": 0,
                }
            ],
            conflict=["group", "topic", "partition", "offset"],
        )
        await conn.execute(
            update(stream_attempts)
            .where(a.group == group, a.topic == topic, a.partition == partition, a.offset == offset)
            .values(acked=1)
        )

    async def _advance(
        self, executor: Executor, group: str, topic: str, partition: int, next_offset: int
    ) -> int:
        """Move the watermark over acknowledged offsets; forget the per-offset rows below it."""
        a = stream_attempts.c
        in_partition = (a.group == group, a.topic == topic, a.partition == partition)
        acked = await executor.rows(
            select(a.offset).where(*in_partition, a.acked == 1, a.offset >= next_offset).order_by(a.offset)
        )
        for (offset,) in acked:
            if int(offset) != next_offset:
                break
            next_offset += 1
        await executor.run(delete(stream_attempts).where(*in_partition, a.offset < next_offset))
        return next_offset

    async def _fail(
        self,
        executor: Executor,
        group: str,
        topic: str,
        partition: int,
        next_offset: int,
        offset: int,
        error: str,
    ) -> int:
        """Charge `offset` one failed attempt; dead-letter it at the limit. Returns the watermark."""
        a = stream_attempts.c
        where = (a.group == group, a.topic == topic, a.partition == partition, a.offset == offset)
        await executor.insert_ignore(
            stream_attempts,
            [
                {
                    "group": group,
                    "topic": topic,
                    "partition": partition,
                    "offset": offset,
                    "failures": 0,
                    "acked": 0,
                }
            ],
            conflict=["group", "topic", "partition", "offset"],
        )
        [(failures,)] = await executor.rows(
            update(stream_attempts)
            .where(*where)
            .values(failures=a.failures + 1, last_error=error[:4000])
            .returning(a.failures)
        )
        if failures < self.max_attempts:
            return next_offset
        log = stream_log.c
        [(message_id, envelope)] = await executor.rows(
            select(log.message_id, log.envelope).where(
                log.topic == topic, log.partition == partition, log.offset == offset
            )
        )
        message = Message.from_json(envelope)
        await executor.run(
            insert(dead_letters).values(
                id=new_id(),
                group=group,
                topic=topic,
                partition=partition,
                offset=offset,
                message_id=message_id,
                type=message.type,
                envelope=envelope,
                attempts=failures,
                last_error=error[:4000],
                dead_at=self._clock.now(),
                status=DeadLetterStatus.DEAD.value,
            )
        )
        await executor.run(update(stream_attempts).where(*where).values(acked=1))
        self._hook.dead_lettered(group=group, topic=topic)
        return await self._advance(executor, group, topic, partition, next_offset)

    # ---- dead letters --------------------------------------------------------------------------

    async def _take_replays(
        self,
        executor: Executor,
        topic: str,
        group: str,
        consumer: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
    ) -> list[Delivery]:
        rows = await executor.rows(_REPLAYS, {"group": group, "topic": topic, "now": now, "limit": limit})
        if not rows:
            return []
        d = dead_letters.c
        await executor.run(
            update(dead_letters).where(d.id.in_([r[0] for r in rows])).values(visible_at=lease_until)
        )
        return [
            Delivery(
                message=Message.from_json(envelope),
                topic=topic,
                group=group,
                consumer=consumer,
                partition=int(partition),
                offset=int(offset),
                attempt=int(attempts) + 1,
                receipt=f"{_DLQ_RECEIPT}{dead_letter_id}",
            )
            for dead_letter_id, partition, offset, envelope, attempts in rows
        ]

    async def _settle_replay(self, delivery: Delivery, *, error: str | None) -> None:
        dead_letter_id = uuid.UUID(delivery.receipt.removeprefix(_DLQ_RECEIPT))
        d = dead_letters.c
        pending = (d.id == dead_letter_id, d.status == DeadLetterStatus.REPLAYING.value)
        async with self._db.write() as conn:
            if error is None:
                values: dict[str, Any] = {
                    "status": DeadLetterStatus.REPLAYED.value,
                    "replayed_at": self._clock.now(),
                    "visible_at": None,
                }
            else:
                # A replay that fails goes straight back to the queue: it already used its attempts.
                values = {
                    "status": DeadLetterStatus.DEAD.value,
                    "attempts": d.attempts + 1,
                    "last_error": error[:4000],
                    "dead_at": self._clock.now(),
                    "visible_at": None,
                }
            result = await conn.execute(update(dead_letters).where(*pending).values(**values))
        if error is not None and result.rowcount:
            self._hook.dead_lettered(group=delivery.group, topic=delivery.topic)

    async def dead_letters(
        self, *, topic: str | None = None, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        d = dead_letters.c
        query = select(dead_letters).order_by(d.id).limit(limit)
        if topic is not None:
            query = query.where(d.topic == topic)
        if group is not None:
            query = query.where(d.group == group)
        async with self._db.read() as conn:
            return [_dead_letter(row) for row in await conn.execute(query)]

    async def dead_letter(self, dead_letter_id: uuid.UUID) -> DeadLetter | None:
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id))
            ).first()
        return _dead_letter(row) if row else None

    async def replay_dead_letters(
        self, *, ids: Sequence[uuid.UUID] | None = None, topic: str | None = None
    ) -> int:
        d = dead_letters.c
        if ids is not None:
            # Named explicitly: a letter already replayed once may be replayed again.
            query = update(dead_letters).where(
                d.id.in_(list(ids)),
                d.status.in_([DeadLetterStatus.DEAD.value, DeadLetterStatus.REPLAYED.value]),
            )
        else:
            query = update(dead_letters).where(d.status == DeadLetterStatus.DEAD.value)
        if topic is not None:
            query = query.where(d.topic == topic)
        async with self._db.write() as conn:
            result = await conn.execute(
                query.values(status=DeadLetterStatus.REPLAYING.value, visible_at=None)
            )
        return int(result.rowcount)

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
            heads = {
                int(p): int(n)
                for p, n in await conn.execute(
                    select(stream_heads.c.partition, stream_heads.c.next_offset).where(
                        stream_heads.c.topic == topic
                    )
                )
            }
            targets = sorted(heads) if partition is None else [partition]
            await insert_ignore(
                conn,
                stream_cursors,
                [
                    {"group": group, "topic": topic, "partition": p, "next_offset": 0, "batch_end": 0}
                    for p in targets
                ],
                conflict=["group", "topic", "partition"],
            )
            log = stream_log.c
            a = stream_attempts.c
            for p in targets:
                if from_offset is not None:
                    target = min(from_offset, heads.get(p, 0))
                else:
                    first = (
                        await conn.execute(
                            select(func.min(log.offset)).where(
                                log.topic == topic, log.partition == p, log.appended_at >= from_time
                            )
                        )
                    ).scalar_one()
                    target = heads.get(p, 0) if first is None else int(first)
                await self._set_cursor(SqlAlchemyExecutor(conn), group, topic, p, target, target, None, None)
                # A rewound group starts these messages afresh: earlier failures do not count.
                await conn.execute(
                    delete(stream_attempts).where(a.group == group, a.topic == topic, a.partition == p)
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


def _dead_letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        group=row.group,
        topic=row.topic,
        partition=int(row.partition),
        offset=int(row.offset),
        message=Message.from_json(row.envelope),
        attempts=int(row.attempts),
        last_error=row.last_error,
        dead_at=row.dead_at,
        status=DeadLetterStatus(row.status),
        replayed_at=row.replayed_at,
    )
