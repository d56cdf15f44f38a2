"""`StreamProjector`: the same read models fed from a broker (Redis Streams, NATS JetStream).

`Projector` reads the SQL log table by offset. With a broker configured the events never reach that
table, so this projector consumes the projection's topics through the `Stream` port instead, as a
consumer group of its own (`projection:<name>`), and keeps the guarantee the read model relies on:
**a message is applied once, even though the broker delivers at least once.**

How: every `Delivery` carries its partition and its offset, which increases within a partition on
every backend. The projection's checkpoint (`projection_checkpoints`: the next offset to apply, per
topic partition) is locked, compared and advanced in the same transaction as the effect, exactly as
for the SQL log. A delivery whose offset is below the checkpoint was applied by an earlier transaction
that committed (its ack may have been lost to a crash): it is skipped, then acknowledged. So:

- crash after commit, before ack → redelivered, skipped by the checkpoint, acked;
- crash before commit → effect and checkpoint rolled back together, redelivered, applied once;
- two workers of one projection → the checkpoint's row lock serializes them; the second skips what
  the first applied.

A batch whose `apply` raises is rolled back and retried one message per transaction, so one poison
message costs only itself: it is nacked (the stream dead-letters it after `max_attempts`), and the
messages behind it in its partition are not acknowledged, so they come back, in order, after it.
A dead letter replayed to the group is applied regardless of the checkpoint (it was never applied:
its transaction rolled back) but at most once, through the inbox.

`rebuild()` is the SQL-log projector's, fed from a second group (`projection:<name>:rebuild`) rewound
to offset 0: replay into `<table>__rebuild` copies in short transactions, then under the live
checkpoint's lock drain what arrived meanwhile, swap the copies in and set the checkpoint to the
copies' positions. The live group then finds everything up to there below the checkpoint and skips it.

Being a consumer group, the live projector reports to a `MessagingHook` like any `Consumer` does,
labelled with its group: redeliveries (attempt > 1), dedup hits (deliveries found below the
checkpoint, or replayed dead letters the inbox had recorded), messages applied, and lag per topic.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook
from mercato.kit.messaging.inbox import Inbox
from mercato.kit.messaging.message import Message
from mercato.kit.messaging.stream import Delivery, Stream
from mercato.kit.observability import get_logger
from mercato.kit.projections.hooks import ProjectionHook
from mercato.kit.projections.projector import Projection, Projector, RebuildReport
from mercato.kit.storage import Database

__all__ = ["StreamProjector"]

_log = get_logger("mercato.projections")

_Key = tuple[str, int]


class StreamProjector(Projector):
    """Runs one projection from a `Stream`. `run_once` is a `PeriodicJob` callable (messages applied)."""

    def __init__(
        self,
        db: Database,
        projection: Projection,
        stream: Stream,
        *,
        batch_size: int = 500,
        clock: Clock | None = None,
        hook: ProjectionHook | None = None,
        consumer: str | None = None,
        messaging_hook: MessagingHook | None = None,
    ) -> None:
        super().__init__(db, projection, batch_size=batch_size, clock=clock, hook=hook)
        self._messaging = messaging_hook or NullMessagingHook()
        # Deliveries of the transaction in progress found already applied: reported once it commits.
        self._skipped: list[Delivery] = []
        self._stream = stream
        self.group = f"projection:{projection.name}"
        self.rebuild_group = f"{self.group}:rebuild"
        self._consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._inbox = Inbox(clock=clock)

    # ---- live ----------------------------------------------------------------------------------

    async def run_once(self) -> int:
        applied = 0
        for topic in self.projection.topics:
            deliveries = await self._stream.read(
                topic, self.group, self._consumer, max_messages=self.batch_size, block_s=0
            )
            for delivery in deliveries:
                if delivery.attempt > 1:
                    self._messaging.consumer_redelivered(group=delivery.group, topic=delivery.topic)
            if deliveries:
                applied += await self._consume(deliveries, self._live)
        if applied:
            self._hook.applied(projection=self.name, messages=applied)
        await self.lag()
        return applied

    async def lag(self) -> int:
        behind = 0
        for topic in self.projection.topics:
            topic_lag = await self._stream.lag(topic, self.group)
            self._messaging.consumer_lag(group=self.group, topic=topic, messages=topic_lag)
            behind += topic_lag
        self._hook.lag(projection=self.name, messages=behind)
        return behind

    # ---- rebuild -------------------------------------------------------------------------------

    async def rebuild(self) -> RebuildReport:
        started = time.perf_counter()
        copies = await self._fresh_copies()
        for topic in self.projection.topics:
            # Creates the group at the start if it is new; rewinds the one a previous rebuild left.
            await self._stream.read(topic, self.rebuild_group, self._consumer, max_messages=1, block_s=0)
            await self._stream.replay(topic, self.rebuild_group, from_offset=0)
        positions: dict[_Key, int] = {}
        total = 0
        try:
            while True:  # the bulk, in short transactions: the live projector keeps running
                batch = await self._read_rebuild()
                if not batch:
                    break
                async with self._db.write() as conn:
                    total += await self._apply_in(conn, batch, positions, copies)
                await self._ack(batch)
            async with self._db.write() as conn:
                await self._lock(conn, set(positions))
                while batch := await self._read_rebuild():  # under the lock: whatever arrived meanwhile
                    total += await self._apply_in(conn, batch, positions, copies)
                    await self._ack(batch)
                await self._swap_in(conn, copies)
                await self._save(conn, positions)
        except BaseException:
            await self._drop_copies(copies)
            raise
        return self._rebuilt(total, started)

    async def _read_rebuild(self) -> list[Delivery]:
        out: list[Delivery] = []
        for topic in self.projection.topics:
            out += await self._stream.read(
                topic, self.rebuild_group, self._consumer, max_messages=self.batch_size, block_s=0
            )
        return out

    # ---- internals -----------------------------------------------------------------------------

    async def _consume(self, deliveries: Sequence[Delivery], targets: Mapping[str, Table]) -> int:
        self._skipped = []
        try:
            async with self._db.write() as conn:
                positions = await self._lock(conn, {(d.topic, d.partition) for d in deliveries})
                applied = await self._apply_in(conn, deliveries, positions, targets)
        except Exception:  # noqa: BLE001 - one poison message must not hold the batch: isolate it
            return await self._consume_one_by_one(deliveries, targets)
        self._report(deliveries)
        await self._ack(deliveries)
        return applied

    def _report(self, committed: Sequence[Delivery]) -> None:
        """After a live transaction committed: each delivery was either applied or a dedup hit."""
        skipped = {id(d) for d in self._skipped}
        for delivery in committed:
            labels = {"group": delivery.group, "topic": delivery.topic}
            if id(delivery) in skipped:
                self._messaging.consumer_dedup_hit(**labels)
            else:
                self._messaging.consumer_processed(**labels)
        self._skipped = []

    async def _consume_one_by_one(self, deliveries: Sequence[Delivery], targets: Mapping[str, Table]) -> int:
        applied = 0
        blocked: set[_Key] = set()
        for delivery in deliveries:
            key = (delivery.topic, delivery.partition)
            if key in blocked:
                continue  # behind a failed message: redelivered after it, in order
            self._skipped = []
            try:
                async with self._db.write() as conn:
                    positions = await self._lock(conn, {key})
                    applied += await self._apply_in(conn, [delivery], positions, targets)
            except Exception as exc:  # noqa: BLE001 - reported to the stream, which counts attempts
                _log.warning(
                    "projection_apply_failed",
                    projection=self.name,
                    message_id=str(delivery.message.id),
                    error=type(exc).__name__,
                )
                await self._stream.nack(delivery, error=f"{type(exc).__name__}: {exc}"[:500])
                if not delivery.from_dead_letters:
                    blocked.add(key)
                continue
            self._report([delivery])
            await self._stream.ack(delivery)
        return applied

    async def _lock(self, conn: AsyncConnection, keys: set[_Key]) -> dict[_Key, int]:
        return await self._lock_checkpoint(conn, {key: 0 for key in keys})

    async def _apply_in(
        self,
        conn: AsyncConnection,
        deliveries: Sequence[Delivery],
        positions: dict[_Key, int],
        targets: Mapping[str, Table],
    ) -> int:
        """Apply what is past the checkpoint; `positions` is advanced in place and saved with it."""
        applied = 0
        moved: dict[_Key, int] = {}
        pending: list[Message] = []
        for delivery in deliveries:
            key = (delivery.topic, delivery.partition)
            if delivery.from_dead_letters:
                # Never applied (its transaction rolled back): the checkpoint moved on without it.
                seen = await self._inbox.seen_or_record(
                    conn, consumer=self.group, message_id=delivery.message.id
                )
                if not seen:
                    await self.projection.apply_all(conn, pending, targets)
                    pending = []
                    await self.projection.apply_all(conn, [delivery.message], targets)
                    applied += 1
                else:
                    self._skipped.append(delivery)
                continue
            if delivery.offset < positions.get(key, 0):
                self._skipped.append(delivery)
                continue  # applied and committed before; this is a redelivery
            pending.append(delivery.message)
            positions[key] = moved[key] = delivery.offset + 1
            applied += 1
        await self.projection.apply_all(conn, pending, targets)
        await self._save(conn, moved)
        return applied

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self._stream.ack(delivery)
