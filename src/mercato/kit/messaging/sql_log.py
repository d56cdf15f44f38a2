"""`SqlLogStream`: the `Stream` port on the application's own database (embedded mode).

A partitioned append-only log table, one cursor row per (group, topic, partition) and a small
per-offset table of failures and out-of-order acks. No broker to run; the price is that every
read and ack is a database write.

Appends lock the partition's head row, so offsets within a partition commit in offset order and a
reader never acknowledges past a gap that a slower publisher fills later. A group has at most one
batch out per partition: the next batch starts after the previous one is acknowledged, or after its
visibility deadline (a dead consumer), so a partition is consumed in order even across redeliveries.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.ids import new_id
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook
from mercato.kit.messaging.message import Message, partition_for
from mercato.kit.messaging.stream import (
    DEAD_LETTER_RECEIPT_PREFIX,
    DeadLetter,
    DeadLetterStatus,
    Delivery,
    check_replay_start,
    poll_read,
)
from mercato.kit.messaging.tables import (
    dead_letters,
    stream_attempts,
    stream_cursors,
    stream_heads,
    stream_log,
)
from mercato.kit.storage import Database

__all__ = ["SqlLogStream"]

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX


async def insert_ignore(
    conn: AsyncConnection, table: Table, rows: list[dict[str, Any]], *, conflict: list[str]
) -> int:
    """INSERT ... ON CONFLICT DO NOTHING; returns how many rows were inserted.

    Both dialects spell it the same way but SQLAlchemy builds it per dialect.
    """
    if not rows:
        return 0
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    result = await conn.execute(
        dialect_insert(table).values(rows).on_conflict_do_nothing(index_elements=conflict)
    )
    return int(result.rowcount)


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

    # ---- publishing ----------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        by_partition: dict[tuple[str, int], list[Message]] = defaultdict(list)
        for message in messages:
            by_partition[(message.topic, partition_for(message.key, partitions=self.partitions))].append(
                message
            )
        if not by_partition:
            return
        now = self._clock.now()
        async with self._db.write() as conn:
            # A fixed lock order (topic, partition) keeps concurrent publishers from deadlocking.
            for (topic, partition), batch in sorted(by_partition.items()):
                await self._append(conn, topic, partition, batch, now)

    async def _append(
        self, conn: AsyncConnection, topic: str, partition: int, batch: list[Message], now: datetime
    ) -> None:
        await insert_ignore(
            conn,
            stream_heads,
            [{"topic": topic, "partition": partition, "next_offset": 0}],
            conflict=["topic", "partition"],
        )
        head = stream_heads.c
        where = and_(head.topic == topic, head.partition == partition)
        next_offset = int(
            (await conn.execute(select(head.next_offset).where(where).with_for_update())).scalar_one()
        )
        # Checked under the head lock: a duplicate of the same message hashes to this partition,
        # so a concurrent publisher of it waits here and then sees it.
        ids = [m.id for m in batch]
        stored = set(
            (
                await conn.execute(select(stream_log.c.message_id).where(stream_log.c.message_id.in_(ids)))
            ).scalars()
        )
        rows: list[dict[str, Any]] = []
        for message in batch:
            if message.id in stored:
                continue
            stored.add(message.id)
            rows.append(
                {
                    "topic": topic,
                    "partition": partition,
                    "offset": next_offset + len(rows),
                    "message_id": message.id,
                    "key": message.key,
                    "envelope": message.to_json(),
                    "appended_at": now,
                }
            )
        if rows:
            await conn.execute(insert(stream_log), rows)
            await conn.execute(update(stream_heads).where(where).values(next_offset=next_offset + len(rows)))

    # ---- consuming -----------------------------------------------------------------------------

    async def read(
        self, topic: str, group: str, consumer: str, *, max_messages: int, block_s: float
    ) -> list[Delivery]:
        return await poll_read(
            lambda: self._read_once(topic, group, consumer, max_messages),
            max_messages=max_messages,
            block_s=block_s,
            poll_interval_s=self.poll_interval_s,
        )

    async def _read_once(self, topic: str, group: str, consumer: str, max_messages: int) -> list[Delivery]:
        now = self._clock.now()
        lease_until = now + timedelta(seconds=self.visibility_timeout_s)
        async with self._db.write() as conn:
            out = await self._take_replays(conn, topic, group, consumer, now, lease_until, max_messages)
            heads = {
                int(p): int(n)
                for p, n in await conn.execute(
                    select(stream_heads.c.partition, stream_heads.c.next_offset).where(
                        stream_heads.c.topic == topic
                    )
                )
            }
            if not heads or len(out) >= max_messages:
                return out
            await insert_ignore(
                conn,
                stream_cursors,
                [
                    {"group": group, "topic": topic, "partition": p, "next_offset": 0, "batch_end": 0}
                    for p in sorted(heads)
                ],
                conflict=["group", "topic", "partition"],
            )
            c = stream_cursors.c
            # SKIP LOCKED: a partition another consumer of the group is reading right now is simply
            # not ours this time; consumers spread over partitions instead of queueing.
            cursors = list(
                await conn.execute(
                    select(c.partition, c.next_offset, c.batch_end, c.owner, c.lease_until)
                    .where(c.group == group, c.topic == topic)
                    .order_by(c.partition)
                    .with_for_update(skip_locked=True)
                )
            )
            start = self._next_start % max(len(cursors), 1)
            self._next_start += 1
            for cursor in cursors[start:] + cursors[:start]:
                if len(out) >= max_messages:
                    break
                partition = int(cursor.partition)
                next_offset, batch_end = int(cursor.next_offset), int(cursor.batch_end)
                if batch_end > next_offset:
                    if cursor.lease_until is not None and cursor.lease_until > now:
                        continue
                    # The batch's deadline passed: its consumer died or stalled. The first
                    # unacknowledged message is the likely culprit, so it is charged the attempt.
                    error = f"visibility timeout expired (consumer {cursor.owner})"
                    next_offset = await self._fail(
                        conn, group, topic, partition, next_offset, next_offset, error
                    )
                elif cursor.lease_until is not None and cursor.lease_until > now:
                    continue
                if next_offset >= heads.get(partition, 0):
                    # Caught up. Write only if an expired batch was just settled: an idle poll
                    # must not rewrite every cursor row.
                    if (next_offset, batch_end, cursor.lease_until) != (next_offset, next_offset, None):
                        await self._set_cursor(
                            conn, group, topic, partition, next_offset, next_offset, None, None
                        )
                    continue
                taken = await self._deliver(
                    conn, topic, group, consumer, partition, next_offset, max_messages - len(out)
                )
                if taken:
                    out.extend(taken)
                    end = taken[-1].offset + 1
                    await self._set_cursor(
                        conn, group, topic, partition, next_offset, end, consumer, lease_until
                    )
                else:
                    await self._set_cursor(
                        conn, group, topic, partition, next_offset, next_offset, None, None
                    )
            return out

    async def _deliver(
        self,
        conn: AsyncConnection,
        topic: str,
        group: str,
        consumer: str,
        partition: int,
        from_offset: int,
        limit: int,
    ) -> list[Delivery]:
        log = stream_log.c
        rows = list(
            await conn.execute(
                select(log.offset, log.envelope)
                .where(log.topic == topic, log.partition == partition, log.offset >= from_offset)
                .order_by(log.offset)
                .limit(limit)
            )
        )
        if not rows:
            return []
        a = stream_attempts.c
        attempts = {
            int(r.offset): (int(r.failures), bool(r.acked))
            for r in await conn.execute(
                select(a.offset, a.failures, a.acked).where(
                    a.group == group,
                    a.topic == topic,
                    a.partition == partition,
                    a.offset.between(int(rows[0].offset), int(rows[-1].offset)),
                )
            )
        }
        deliveries = []
        for row in rows:
            failures, acked = attempts.get(int(row.offset), (0, False))
            if acked:
                continue
            deliveries.append(
                Delivery(
                    message=Message.from_json(row.envelope),
                    topic=topic,
                    group=group,
                    consumer=consumer,
                    partition=partition,
                    offset=int(row.offset),
                    attempt=failures + 1,
                )
            )
        return deliveries

    async def ack(self, delivery: Delivery) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._settle_replay(delivery, error=None)
            return
        async with self._db.write() as conn:
            cursor = await self._lock_cursor(conn, delivery)
            if cursor is None:
                return
            next_offset, batch_end = cursor
            await self._mark_acked(conn, delivery.group, delivery.topic, delivery.partition, delivery.offset)
            advanced = await self._advance(
                conn, delivery.group, delivery.topic, delivery.partition, next_offset
            )
            values: dict[str, Any] = {"next_offset": advanced}
            if advanced >= batch_end:
                values.update(batch_end=advanced, lease_until=None)
            await conn.execute(update(stream_cursors).where(*self._cursor_key(delivery)).values(**values))

    async def nack(self, delivery: Delivery, *, error: str) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._settle_replay(delivery, error=error)
            return
        async with self._db.write() as conn:
            cursor = await self._lock_cursor(conn, delivery)
            if cursor is None:
                return
            next_offset, _ = cursor
            advanced = await self._fail(
                conn, delivery.group, delivery.topic, delivery.partition, next_offset, delivery.offset, error
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

    async def _lock_cursor(self, conn: AsyncConnection, delivery: Delivery) -> tuple[int, int] | None:
        """(next_offset, batch_end) when `delivery` is still outstanding; None when it is stale
        (already acknowledged, revoked by a nack, or rewound by a replay)."""
        c = stream_cursors.c
        row = (
            await conn.execute(
                select(c.next_offset, c.batch_end).where(*self._cursor_key(delivery)).with_for_update()
            )
        ).first()
        if row is None or not int(row.next_offset) <= delivery.offset < int(row.batch_end):
            return None
        return int(row.next_offset), int(row.batch_end)

    async def _set_cursor(
        self,
        conn: AsyncConnection,
        group: str,
        topic: str,
        partition: int,
        next_offset: int,
        batch_end: int,
        owner: str | None,
        lease_until: datetime | None,
    ) -> None:
        c = stream_cursors.c
        await conn.execute(
            update(stream_cursors)
            .where(c.group == group, c.topic == topic, c.partition == partition)
            .values(next_offset=next_offset, batch_end=batch_end, owner=owner, lease_until=lease_until)
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
        self, conn: AsyncConnection, group: str, topic: str, partition: int, next_offset: int
    ) -> int:
        """Move the watermark over acknowledged offsets; forget the per-offset rows below it."""
        a = stream_attempts.c
        in_partition = (a.group == group, a.topic == topic, a.partition == partition)
        acked = (
            await conn.execute(
                select(a.offset)
                .where(*in_partition, a.acked == 1, a.offset >= next_offset)
                .order_by(a.offset)
            )
        ).scalars()
        for offset in acked:
            if int(offset) != next_offset:
                break
            next_offset += 1
        await conn.execute(delete(stream_attempts).where(*in_partition, a.offset < next_offset))
        return next_offset

    async def _fail(
        self,
        conn: AsyncConnection,
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
        failures = int(
            (
                await conn.execute(
                    update(stream_attempts)
                    .where(*where)
                    .values(failures=a.failures + 1, last_error=error[:4000])
                    .returning(a.failures)
                )
            ).scalar_one()
        )
        if failures < self.max_attempts:
            return next_offset
        log = stream_log.c
        row = (
            await conn.execute(
                select(log.message_id, log.envelope).where(
                    log.topic == topic, log.partition == partition, log.offset == offset
                )
            )
        ).one()
        message = Message.from_json(row.envelope)
        await conn.execute(
            insert(dead_letters).values(
                id=new_id(),
                group=group,
                topic=topic,
                partition=partition,
                offset=offset,
                message_id=row.message_id,
                type=message.type,
                envelope=row.envelope,
                attempts=failures,
                last_error=error[:4000],
                dead_at=self._clock.now(),
                status=DeadLetterStatus.DEAD.value,
            )
        )
        await conn.execute(update(stream_attempts).where(*where).values(acked=1))
        self._hook.dead_lettered(group=group, topic=topic)
        return await self._advance(conn, group, topic, partition, next_offset)

    # ---- dead letters --------------------------------------------------------------------------

    async def _take_replays(
        self,
        conn: AsyncConnection,
        topic: str,
        group: str,
        consumer: str,
        now: datetime,
        lease_until: datetime,
        limit: int,
    ) -> list[Delivery]:
        d = dead_letters.c
        rows = list(
            await conn.execute(
                select(d.id, d.partition, d.offset, d.envelope, d.attempts)
                .where(
                    d.group == group,
                    d.topic == topic,
                    d.status == DeadLetterStatus.REPLAYING.value,
                    (d.visible_at.is_(None)) | (d.visible_at <= now),
                )
                .order_by(d.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if not rows:
            return []
        await conn.execute(
            update(dead_letters).where(d.id.in_([r.id for r in rows])).values(visible_at=lease_until)
        )
        return [
            Delivery(
                message=Message.from_json(r.envelope),
                topic=topic,
                group=group,
                consumer=consumer,
                partition=int(r.partition),
                offset=int(r.offset),
                attempt=int(r.attempts) + 1,
                receipt=f"{_DLQ_RECEIPT}{r.id}",
            )
            for r in rows
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
                await self._set_cursor(conn, group, topic, p, target, target, None, None)
                # A rewound group starts these messages afresh: earlier failures do not count.
                await conn.execute(
                    delete(stream_attempts).where(a.group == group, a.topic == topic, a.partition == p)
                )

    async def lag(self, topic: str, group: str) -> int:
        h, c = stream_heads.c, stream_cursors.c
        async with self._db.read() as conn:
            heads = {
                int(p): int(n)
                for p, n in await conn.execute(select(h.partition, h.next_offset).where(h.topic == topic))
            }
            done = {
                int(p): int(n)
                for p, n in await conn.execute(
                    select(c.partition, c.next_offset).where(c.group == group, c.topic == topic)
                )
            }
        return sum(max(head - done.get(p, 0), 0) for p, head in heads.items())


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
