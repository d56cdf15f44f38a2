"""Inbox dedup and the consumer runner.

At-least-once delivery means duplicates. A consumer records each message id in the inbox in the
same transaction as the message's effect; a duplicate finds the record and is skipped. The effect
and the record commit together, so "applied" and "recorded" can never disagree.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.messaging.hooks import LagReporter, MessagingHook, NullMessagingHook
from mercato.kit.messaging.message import Message, MessageReader
from mercato.kit.messaging.stream import Delivery, Stream
from mercato.kit.messaging.tables import inbox
from mercato.kit.observability import get_logger, message_spans
from mercato.kit.storage import Database
from mercato.kit.storage.statements import insert_ignore
from mercato.kit.storage.statements_in_tx import on_connection

__all__ = ["BatchHandler", "Consumer", "Handler", "Inbox"]

_log = get_logger("mercato.messaging")

_CONFLICT = ["consumer", "message_id"]
# A consumer reads up to 100 messages by default: one statement for a whole read.
_ROWS_PER_STATEMENT = 128

Handler = Callable[[AsyncConnection, Message], Awaitable[None]]
"""Applies one message's effect on the given connection (inside the inbox transaction)."""

BatchHandler = Callable[[AsyncConnection, Sequence[Message]], Awaitable[None]]
"""Applies a whole batch's new messages, in delivery order, on the given connection (inside the inbox
transaction): a handler that loads and writes once for the batch rather than once per message."""


@runtime_checkable
class _AcksInTransaction(Protocol):
    """A stream in a database whose acks can run in a consumer's transaction (`SqlLogStream`)."""

    @property
    def database(self) -> Database: ...

    async def ack_in_order_runs(self, deliveries: Sequence[Delivery], conn: Any = None) -> list[Delivery]: ...


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

    async def record_new(
        self, conn: AsyncConnection, *, consumer: str, message_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        """Record every id of `message_ids` not yet processed by `consumer`, in one statement; the
        ones it recorded (to apply now). The rest are duplicates. Same locking as `seen_or_record`."""
        now = self._clock.now()
        rows = [
            {"consumer": consumer, "message_id": m, "processed_at": now} for m in dict.fromkeys(message_ids)
        ]
        # Prepared once per batch size on the raw-driver layer, in the consumer's transaction.
        executor = on_connection(conn)
        new: set[uuid.UUID] = set()
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            new |= await executor.insert_new(
                inbox, rows[start : start + _ROWS_PER_STATEMENT], conflict=_CONFLICT, key="message_id"
            )
        return new

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

    A read's whole batch goes through one write transaction: one statement records every message
    id in the inbox and returns the new ones, the handler applies those in delivery order, it
    commits, then the batch is acknowledged (`Stream.ack_many`: one statement per partition on the
    SQL log). A crash before the ack redelivers; the inbox skips what committed. On the SQL log of
    the consumer's own database the common acks are the transaction's last statement instead
    (ADR 0083): they commit with the effects, one commit less a pass. A handler
    exception rolls the batch back, and the batch is done again one delivery per transaction:
    the failing delivery is nacked (dead-lettered after the stream's max attempts), the others
    apply, and the partition's later deliveries of the batch are left for redelivery, in order.

    `run_once` is a `PeriodicJob` callable returning how many deliveries it handled. With a
    `reader` the handler sees each message as the reader returns it (its data upcast to the
    current schema version); a message the reader refuses fails like a handler error.

    With a `batch_handler` a pass first applies the batch's new messages in one call of it (its
    statements then cost per batch, not per message). If that call fails, the transaction rolls
    back and the pass goes on one message at a time through `handler`, which finds the failing
    delivery as above: the batch handler must have the same effect as `handler` applied in turn.
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
        batch_handler: BatchHandler | None = None,
    ) -> None:
        self._db = db
        self._batch_handler = batch_handler
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
        self._lag = LagReporter(stream, self._hook, interval_s=idle_lag_interval_s)
        # The SQL log on this database: the batch's acks ride in its transaction (ADR 0083).
        self._acks_inside = (
            stream if isinstance(stream, _AcksInTransaction) and stream.database is db else None
        )
        self._unacked: list[Delivery] = []  # what the last transaction's acks left for `ack_many`

    async def run_once(self) -> int:
        deliveries = await self._stream.read(
            self.topic, self.group, self.name, max_messages=self.max_messages, block_s=self._block_s
        )
        labels = {"group": self.group, "topic": self.topic}
        for delivery in deliveries:
            if delivery.attempt > 1:
                self._hook.consumer_redelivered(**labels)
        handled = 0
        failures: list[tuple[Delivery, Exception]] = []
        batched = self._batch_handler is not None
        while deliveries:
            outcome: list[bool] | tuple[Delivery, Exception] | None
            if batched:
                outcome = await self._batch_in_one_transaction(deliveries)
                if outcome is None:
                    batched = False  # rolled back: find the failing delivery one at a time
                    continue
            else:
                outcome = await self._in_one_transaction(deliveries)
            if isinstance(outcome, list):
                unacked, self._unacked = self._unacked, []
                if unacked:
                    await self._stream.ack_many(unacked)
                handled = len(deliveries)
                for fresh in outcome:
                    (self._hook.consumer_processed if fresh else self._hook.consumer_dedup_hit)(**labels)
                break
            failures.append(outcome)
            deliveries = _without(deliveries, outcome[0])
        # Nacked after the rest is acknowledged, as one delivery at a time did: a nack revokes the
        # later deliveries of its partition, and an earlier one's ack must not find it revoked.
        for failed, exc in failures:
            _log.warning(
                "message_failed",
                group=self.group,
                message_id=str(failed.message.id),
                type=failed.message.type,
                attempt=failed.attempt,
                error=repr(exc),
            )
            await self._stream.nack(failed, error=f"{type(exc).__name__}: {exc}")
        # The lag gauge costs a statement: at most once a second from passes that had deliveries
        # (after each, it was one more statement per pass: under load, several per second per
        # consumer), and from idle passes (the most frequent, their lag rarely moves) at most once
        # per interval.
        await self._lag.report(self.topic, self.group, busy=bool(handled or failures))
        return handled

    async def _in_one_transaction(
        self, deliveries: list[Delivery]
    ) -> list[bool] | tuple[Delivery, Exception]:
        """Record the batch in the inbox (one statement) and apply its new messages in delivery
        order, in one transaction: per delivery, whether it was applied (False: a duplicate); or,
        rolled back, the delivery whose handler failed and why. Any other error propagates."""
        applied: list[bool] = []
        current: Delivery | None = None
        try:
            async with self._db.write() as conn:
                new = await self._inbox.record_new(
                    conn, consumer=self.group, message_ids=[d.message.id for d in deliveries]
                )
                for current in deliveries:
                    # A message delivered twice in one batch (a replayed dead letter) applies once.
                    fresh = current.message.id in new
                    new.discard(current.message.id)
                    applied.append(fresh)
                    if fresh:
                        await self._apply(conn, current)
                current = None
                await self._ack_inside(conn, deliveries)
        except Exception as exc:
            if current is None:
                raise
            return current, exc
        return applied

    async def _ack_inside(self, conn: AsyncConnection, deliveries: list[Delivery]) -> None:
        """The batch's acks as the transaction's last statement where the stream can; what is left
        (all of it elsewhere) is acknowledged after the commit."""
        if self._acks_inside is None:
            self._unacked = deliveries
        else:
            self._unacked = await self._acks_inside.ack_in_order_runs(deliveries, conn)

    async def _batch_in_one_transaction(self, deliveries: list[Delivery]) -> list[bool] | None:
        """`_in_one_transaction` with the batch handler: one call for every new message of the
        batch. None when it (or the reader) failed: rolled back, for the caller to redo the pass
        one delivery at a time. Any error outside the handler propagates."""
        assert self._batch_handler is not None
        applied: list[bool] = []
        failed: list[Exception] = []
        try:
            async with self._db.write() as conn:
                new = await self._inbox.record_new(
                    conn, consumer=self.group, message_ids=[d.message.id for d in deliveries]
                )
                fresh: list[Delivery] = []
                for delivery in deliveries:
                    # A message delivered twice in one batch (a replayed dead letter) applies once.
                    is_new = delivery.message.id in new
                    new.discard(delivery.message.id)
                    applied.append(is_new)
                    if is_new:
                        fresh.append(delivery)
                if fresh:
                    try:
                        await self._apply_batch(conn, fresh)
                    except Exception as exc:
                        failed.append(exc)
                        raise
                await self._ack_inside(conn, deliveries)
        except Exception as exc:
            if not failed or failed[0] is not exc:
                raise
            _log.info("batch_handler_failed", group=self.group, size=len(deliveries), error=repr(exc))
            return None
        return applied

    async def _apply_batch(self, conn: AsyncConnection, deliveries: list[Delivery]) -> None:
        assert self._batch_handler is not None
        reader = self._reader
        messages = [d.message if reader is None else reader(d.message) for d in deliveries]
        with message_spans(
            f"{self.topic} process",
            [d.message.headers for d in deliveries],
            {
                "messaging.operation.type": "process",
                "messaging.destination.name": self.topic,
                "messaging.consumer.group.name": self.group,
                "messaging.batch.message_count": str(len(deliveries)),
            },
        ):
            await self._batch_handler(conn, messages)

    def _span(self, delivery: Delivery) -> AbstractContextManager[object]:
        return message_spans(
            f"{self.topic} process",
            [delivery.message.headers],
            {
                "messaging.operation.type": "process",
                "messaging.destination.name": self.topic,
                "messaging.consumer.group.name": self.group,
                "messaging.message.id": str(delivery.message.id),
                "cloudevents.event_type": delivery.message.type,
            },
        )

    async def _apply(self, conn: AsyncConnection, delivery: Delivery) -> None:
        message = delivery.message
        with self._span(delivery):
            await self._handler(conn, message if self._reader is None else self._reader(message))


def _without(deliveries: list[Delivery], failed: Delivery) -> list[Delivery]:
    """The batch minus a nacked delivery and, to keep its partition's order, the deliveries of its
    partition after it (the stream redelivers them after it); a dead letter holds back nothing."""
    index = deliveries.index(failed)
    held = failed.partition if not failed.from_dead_letters else None
    return deliveries[:index] + [
        d for d in deliveries[index + 1 :] if d.partition != held or d.from_dead_letters
    ]
