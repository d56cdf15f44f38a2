"""Inbox dedup and the consumer runner.

At-least-once delivery means duplicates. A consumer records each message id in the inbox in the
same transaction as the message's effect; a duplicate finds the record and is skipped. The effect
and the record commit together, so "applied" and "recorded" can never disagree.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook
from mercato.kit.messaging.message import Message, MessageReader
from mercato.kit.messaging.stream import Stream
from mercato.kit.messaging.tables import inbox
from mercato.kit.observability import get_logger, message_spans
from mercato.kit.storage import Database
from mercato.kit.storage.statements import insert_ignore

__all__ = ["Consumer", "Handler", "Inbox"]

_log = get_logger("mercato.messaging")

Handler = Callable[[AsyncConnection, Message], Awaitable[None]]
"""Applies one message's effect on the given connection (inside the inbox transaction)."""


class Inbox:
    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()

    async def seen_or_record(self, conn: AsyncConnection, *, consumer: str, message_id: uuid.UUID) -> bool:
        """True when `consumer` already processed `message_id` (skip it); otherwise record it.

        Call it in the transaction that applies the effect. On PostgreSQL a concurrent duplicate
        waits on the first one's uncommitted row and then sees it, so it never applies twice.
        """
        inserted = await insert_ignore(
            conn,
            inbox,
            [{"consumer": consumer, "message_id": message_id, "processed_at": self._clock.now()}],
            conflict=["consumer", "message_id"],
        )
        return inserted == 0

    async def purge(self, conn: AsyncConnection, *, before: datetime, limit: int | None = None) -> int:
        """Forget records older than `before`; keep them longer than any redelivery or replay window.

        With `limit`, about that many of the oldest go per call (records sharing the limit-th one's
        `processed_at` go with it), so one call never holds the write lock for a whole backlog."""
        old = inbox.c.processed_at < before
        if limit is not None:
            nth = (
                select(inbox.c.processed_at)
                .where(old)
                .order_by(inbox.c.processed_at)
                .offset(limit - 1)
                .limit(1)
                .scalar_subquery()
            )
            # Fewer than `limit` old records: no limit-th row, so every old one goes.
            old = and_(old, or_(nth.is_(None), inbox.c.processed_at <= nth))
        result = await conn.execute(delete(inbox).where(old))
        return int(result.rowcount)


class Consumer:
    """Reads a topic as one member of a group and applies each message exactly once in effect.

    For each delivery: one write transaction runs the inbox check and the handler, commits, then
    the delivery is acknowledged. A crash before the ack redelivers; the inbox skips it. A handler
    exception rolls the transaction back and nacks (dead-lettered after the stream's max attempts);
    the partition's later deliveries of the batch are left for redelivery, to keep their order.

    `run_once` is a `PeriodicJob` callable returning how many deliveries it handled. With a
    `reader` the handler sees each message as the reader returns it (its data upcast to the
    current schema version); a message the reader refuses fails like a handler error.
    """

    def __init__(
        self,
        db: Database,
        stream: Stream,
        *,
        topic: str,
        group: str,
        name: str,
        handler: Handler,
        max_messages: int = 100,
        block_s: float = 0.0,
        inbox_store: Inbox | None = None,
        hook: MessagingHook | None = None,
        idle_lag_interval_s: float = 5.0,
        reader: MessageReader | None = None,
    ) -> None:
        self._db = db
        self._reader = reader
        self._stream = stream
        self.topic = topic
        self.group = group
        self.name = name
        self._handler = handler
        self.max_messages = max_messages
        self._block_s = block_s
        self._inbox = inbox_store or Inbox()
        self._hook = hook or NullMessagingHook()
        self.idle_lag_interval_s = idle_lag_interval_s
        self._lag_due = 0.0  # time.monotonic() by which an idle pass reports the lag again

    async def run_once(self) -> int:
        deliveries = await self._stream.read(
            self.topic, self.group, self.name, max_messages=self.max_messages, block_s=self._block_s
        )
        failed: set[int] = set()
        handled = 0
        labels = {"group": self.group, "topic": self.topic}
        for delivery in deliveries:
            if delivery.partition in failed and not delivery.from_dead_letters:
                continue
            if delivery.attempt > 1:
                self._hook.consumer_redelivered(**labels)
            try:
                with message_spans(
                    f"{self.topic} process",
                    [delivery.message.headers],
                    {
                        "messaging.operation.type": "process",
                        "messaging.destination.name": self.topic,
                        "messaging.consumer.group.name": self.group,
                        "messaging.message.id": str(delivery.message.id),
                        "cloudevents.event_type": delivery.message.type,
                    },
                ):
                    async with self._db.write() as conn:
                        duplicate = await self._inbox.seen_or_record(
                            conn, consumer=self.group, message_id=delivery.message.id
                        )
                        if not duplicate:
                            message = delivery.message
                            await self._handler(
                                conn, message if self._reader is None else self._reader(message)
                            )
            except Exception as exc:  # noqa: BLE001 - any handler failure is a failed attempt
                _log.warning(
                    "message_failed",
                    group=self.group,
                    message_id=str(delivery.message.id),
                    type=delivery.message.type,
                    attempt=delivery.attempt,
                    error=repr(exc),
                )
                await self._stream.nack(delivery, error=f"{type(exc).__name__}: {exc}")
                if not delivery.from_dead_letters:
                    failed.add(delivery.partition)
                continue
            await self._stream.ack(delivery)
            handled += 1
            if duplicate:
                self._hook.consumer_dedup_hit(**labels)
            else:
                self._hook.consumer_processed(**labels)
        # The lag gauge costs a statement: after every pass that had deliveries, but from idle
        # passes (the most frequent, and their lag rarely moves) at most once per interval.
        if deliveries or time.monotonic() >= self._lag_due:
            self._lag_due = time.monotonic() + self.idle_lag_interval_s
            self._hook.consumer_lag(**labels, messages=await self._stream.lag(self.topic, self.group))
        return handled
