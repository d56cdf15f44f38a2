"""Dead letters of the SQL log (messages that used up their attempts) and their replay."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    insert,
    select,
    update,
)

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.messaging.hooks import MessagingHook
from mercato.kit.messaging.message import Message
from mercato.kit.messaging.sql_log_cursors import advance
from mercato.kit.messaging.sql_log_statements import (
    _REPLAYS,
)
from mercato.kit.messaging.stream import (
    DEAD_LETTER_RECEIPT_PREFIX,
    DeadLetter,
    DeadLetterStatus,
    Delivery,
)
from mercato.kit.messaging.tables import (
    dead_letters,
    stream_attempts,
    stream_log,
)
from mercato.kit.storage import Database
from mercato.kit.storage.statements import (
    Executor,
)

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX


class SqlDeadLetters:
    """The SQL log's dead-letter queue: letters listed, fetched, put back for replay, and the
    replays handed to a group's readers before its new messages."""

    def __init__(self, db: Database, clock: Clock, hook: MessagingHook) -> None:
        self._db = db
        self._clock = clock
        self._hook = hook

    async def fail(
        self,
        executor: Executor,
        group: str,
        topic: str,
        partition: int,
        next_offset: int,
        offset: int,
        error: str,
        *,
        max_attempts: int,
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
        if failures < max_attempts:
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
        return await advance(executor, group, topic, partition, next_offset)

    async def take_replays(
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

    async def settle(self, delivery: Delivery, *, error: str | None) -> None:
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

    async def list(
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

    async def get(self, dead_letter_id: uuid.UUID) -> DeadLetter | None:
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id))
            ).first()
        return _dead_letter(row) if row else None

    async def replay(self, *, ids: Sequence[uuid.UUID] | None = None, topic: str | None = None) -> int:
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
