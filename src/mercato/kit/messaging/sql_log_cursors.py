"""A group's position in a partition of the SQL log: its cursor row (next offset, the batch out, who
holds it until when) and the per-offset rows of acknowledgements past the watermark."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    delete,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.messaging.sql_log_statements import (
    _SET_CURSOR,
    _Cursor,
)
from mercato.kit.messaging.stream import (
    Delivery,
)
from mercato.kit.messaging.tables import (
    stream_attempts,
    stream_cursors,
)
from mercato.kit.storage.statements import (
    Executor,
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
