"""A group's position in a partition of the SQL log: its cursor row (next offset, the batch out, who
holds it until when) and the per-offset rows of acknowledgements past the watermark."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    delete,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.messaging.message import Message, partition_for
from mercato.kit.messaging.sql_log_statements import (
    _SET_CURSOR,
    _Cursor,
)
from mercato.kit.messaging.stream import DEAD_LETTER_RECEIPT_PREFIX, Delivery
from mercato.kit.messaging.tables import (
    stream_attempts,
    stream_cursors,
    stream_heads,
    stream_log,
)
from mercato.kit.storage.statements import (
    Executor,
    SqlAlchemyExecutor,
    insert_ignore,
)


def cursor_key(delivery: Delivery) -> tuple[Any, ...]:
    c = stream_cursors.c
    return (c.group == delivery.group, c.topic == delivery.topic, c.partition == delivery.partition)


async def lock_cursor(conn: AsyncConnection, delivery: Delivery) -> _Cursor | None:
    """The partition's cursor when `delivery` is still outstanding and its consumer still
    holds the batch; None when it is stale (already acknowledged, revoked by a nack, rewound
    by a replay, or redelivered to another consumer after its visibility deadline)."""
    c = stream_cursors.c
    row = (
        await conn.execute(
            select(c.next_offset, c.batch_end, c.owner, c.lease_until)
            .where(*cursor_key(delivery))
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


async def set_cursor(
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


async def mark_acked(conn: AsyncConnection, group: str, topic: str, partition: int, offset: int) -> None:
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


async def advance(executor: Executor, group: str, topic: str, partition: int, next_offset: int) -> int:
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


async def rewind(
    conn: AsyncConnection,
    topic: str,
    group: str,
    *,
    from_offset: int | None,
    from_time: datetime | None,
    partition: int | None,
) -> None:
    """`SqlLogStream.replay` in the caller's write transaction: the group's cursors moved back to
    `from_offset` (or the first message appended at or after `from_time`), failures forgotten."""
    heads = {
        int(p): int(n)
        for p, n in await conn.execute(
            select(stream_heads.c.partition, stream_heads.c.next_offset).where(stream_heads.c.topic == topic)
        )
    }
    targets = sorted(heads) if partition is None else [partition]
    await insert_ignore(
        conn,
        stream_cursors,
        [{"group": group, "topic": topic, "partition": p, "next_offset": 0, "batch_end": 0} for p in targets],
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
        await set_cursor(SqlAlchemyExecutor(conn), group, topic, p, target, target, None, None)
        # A rewound group starts these messages afresh: earlier failures do not count.
        await conn.execute(
            delete(stream_attempts).where(a.group == group, a.topic == topic, a.partition == p)
        )


def deliveries_of(
    topic: str,
    group: str,
    consumer: str,
    partition: int,
    rows: Sequence[tuple[Any, ...]],
    lease_until: datetime,
) -> list[Delivery]:
    """A batch's rows as deliveries; the receipt is the batch's claim, which an in-order ack must
    still match (`SqlLogStream._ack_in_order`)."""
    receipt = lease_until.isoformat()
    return [
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
        for offset, envelope, failures, acked in rows
        if not acked
    ]


def partition_batches(
    messages: Sequence[Message], partitions: int
) -> list[tuple[tuple[str, int], list[Message]]]:
    """`messages` grouped by (topic, partition), in that order: a fixed lock order keeps concurrent
    publishers from deadlocking. A message given twice is kept once (the first time)."""
    grouped: dict[tuple[str, int], dict[uuid.UUID, Message]] = defaultdict(dict)
    for message in messages:
        grouped[(message.topic, partition_for(message.key, partitions=partitions))].setdefault(
            message.id, message
        )
    return [(key, list(batch.values())) for key, batch in sorted(grouped.items())]


def ack_runs(
    deliveries: Sequence[Delivery],
) -> tuple[dict[tuple[str, str, str], dict[int, list[Delivery]]], list[list[Delivery]]]:
    """`deliveries` as runs of consecutive offsets, one per (topic, group, consumer, partition, receipt):
    the whole runs of a batch still out, which an in-order ack can take (by (topic, group, consumer),
    then partition), and the rest (dead letters, gaps, a second batch's run), for the general path."""
    runs: dict[tuple[str, str, str, int, str], list[Delivery]] = defaultdict(list)
    for d in deliveries:
        runs[(d.topic, d.group, d.consumer, d.partition, d.receipt)].append(d)
    in_order: dict[tuple[str, str, str], dict[int, list[Delivery]]] = defaultdict(dict)
    general: list[list[Delivery]] = []
    for (topic, group, consumer, partition, receipt), run in runs.items():
        run.sort(key=lambda d: d.offset)
        whole = bool(receipt) and not receipt.startswith(DEAD_LETTER_RECEIPT_PREFIX)
        whole = whole and run[-1].offset - run[0].offset == len(run) - 1
        if whole and partition not in in_order[(topic, group, consumer)]:
            in_order[(topic, group, consumer)][partition] = run
        else:
            general.append(run)
    return {key: runs for key, runs in in_order.items() if runs}, general
