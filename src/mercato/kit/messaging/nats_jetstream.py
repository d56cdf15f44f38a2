"""`JetStreamStream`: the `Stream` port on NATS JetStream (nats-server 2.9+).

Layout, for a name prefix `P` (a NATS token: letters, digits, `_`, `-`):

- One JetStream stream per topic, `P_<topic>`, subjects `P.<topic>.<partition>`, file storage.
  `publish` sets `Nats-Msg-Id` = message id (the server drops a repeat within `dedup_window_s`) and
  waits for every PubAck: a returned publish is stored. `Mercato-Time` carries the publisher clock
  (ms), which replay by time searches, so "appended at" means the same on every backend.
- `Delivery.offset` is the JetStream stream sequence minus one: increasing within a partition,
  with gaps where other partitions' messages sit.
- A durable pull consumer per (group, partition), `<group>-p<partition>`, filtered to the partition's
  subject, `AckExplicit`, `AckWait` = visibility timeout. The receipt is the message's reply subject
  (`$JS.ACK...`); acks are sent as requests, so the ack is processed when `ack` returns.
- Attempts: the consumer's `num_delivered`, minus the deliveries we revoked to keep order after a nack
  (counted in the KV bucket `P_revokes`, read only for redeliveries). `MaxDeliver` stays unlimited
  because JetStream would count those revokes too; at `max_attempts` failures we copy the message to
  the dead-letter bucket `P_dlq` (KV, one key per letter) and `+TERM` it.
- Dead letters being replayed are queued on the work-queue stream `P_dlqreplay`, one durable consumer
  per (topic, group), so only their own group receives them.

Per-partition order: JetStream hands a consumer's messages in sequence order and redelivers (nak or
`AckWait`) before new ones; a nack naks the rest of the outstanding batch after the failed message.
Within one `JetStreamStream` a group has at most one batch out per partition (tracked in process). Two
processes reading one (group, partition) at once can each hold a batch: JetStream 2.9 has no
single-active-consumer, so order across processes needs one reader per partition (see ADR 0015).

The parts: `nats_jetstream_core.py` (configuration, connection, names, creating streams, consumers
and buckets, the pull), `nats_jetstream_dead_letters.py` (the dead-letter bucket and its replay);
this module holds the class with publishing, reading, ack/nack, replay and lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
from nats.js.errors import KeyNotFoundError, NotFoundError

from mercato.kit.messaging.message import Message, partition_for
from mercato.kit.messaging.nats_jetstream_core import TIME_HEADER, Batch
from mercato.kit.messaging.nats_jetstream_dead_letters import JetStreamDeadLetters
from mercato.kit.messaging.stream import (
    DEAD_LETTER_RECEIPT_PREFIX,
    Delivery,
    check_replay_start,
    poll_read,
)

__all__ = ["JetStreamStream"]

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX
_REVOKED_MEMORY = 10_000


class JetStreamStream(JetStreamDeadLetters):
    """The `Stream` port on NATS JetStream. Configuration applies to every topic and group it serves.

    Give a connected `client`, or `servers` to connect lazily on first use (then `aclose` closes it).
    `visibility_timeout_s` becomes the consumers' `AckWait`, timed by the server. `replicas` is each
    stream's and bucket's replication factor on a JetStream cluster (3 in `mercato cluster`). `clock` stamps
    messages (replay by time) and dead letters. `replay_check_interval_s` bounds how often a read also
    looks for dead letters an operator queued from another process.
    """

    # ---- publishing ----------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """Pipelined: every message is sent, in order, before any PubAck is awaited (one connection
        keeps the order per partition); returns once the server stored every one of them, or raises
        `TimeoutError` after `request_timeout_s`. nats-py's PubAck futures have no deadline of their
        own: a message lost with the node that took it (a leader SIGKILLed mid-publish) left this
        waiting for good. A timed-out publish is retried by the caller under the same ids, which
        JetStream deduplicates (`Nats-Msg-Id`)."""
        if not messages:
            return
        js = await self._js()
        for topic in {m.topic for m in messages}:
            await self._ensure_topic(topic)
        stamp = str(int(self._clock.now().timestamp() * 1000))
        acks = [
            await js.publish_async(
                self._subject(m.topic, partition_for(m.key, partitions=self.partitions)),
                m.to_json().encode(),
                headers={"Nats-Msg-Id": str(m.id), TIME_HEADER: stamp},
            )
            for m in messages
        ]
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await asyncio.gather(*acks)
        finally:
            for ack in acks:
                ack.cancel()  # frees nats-py's pending-publish slot of each one left unanswered

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
        stream = await self._ensure_topic(topic)
        out = await self._take_replays(topic, group, consumer, max_messages)
        start = self._next_start % self.partitions
        self._next_start += 1
        for step in range(self.partitions):
            if len(out) >= max_messages:
                break
            p = (start + step) % self.partitions
            slot = (topic, group, p)
            lock = self._locks.setdefault(slot, asyncio.Lock())
            if lock.locked():
                continue  # another reader of this process is taking this partition right now
            async with lock:
                batch = self._batches.get(slot)
                if batch is not None and batch.receipts and batch.deadline > time.monotonic():
                    continue  # this group's batch of the partition is still out
                out.extend(await self._take(stream, topic, group, consumer, p, max_messages - len(out)))
        return out

    async def _take(
        self, stream: str, topic: str, group: str, consumer: str, partition: int, limit: int
    ) -> list[Delivery]:
        durable = self._durable(group, partition)
        await self._ensure_consumer(stream, durable, self._subject(topic, partition))
        msgs = await self._pull(stream, durable, limit)
        batch = Batch(deadline=time.monotonic() + self.visibility_timeout_s)
        deliveries: list[Delivery] = []
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            attempt = meta.num_delivered
            if attempt > 1:
                attempt -= await self._revokes(stream, durable, seq)
            if attempt > self.max_attempts:
                # Its last delivery timed out: that was the max_attempts-th failure.
                await self._dead_letter(
                    msg, group, topic, partition, attempt - 1, "visibility timeout expired (ack wait)"
                )
                continue
            batch.receipts[seq] = msg.reply
            deliveries.append(
                Delivery(
                    message=Message.from_json(msg.data),
                    topic=topic,
                    group=group,
                    consumer=consumer,
                    partition=partition,
                    offset=seq - 1,
                    attempt=attempt,
                    receipt=msg.reply,
                )
            )
        self._batches[(topic, group, partition)] = batch
        return deliveries

    async def _revokes(self, stream: str, durable: str, seq: int) -> int:
        kv = await self._bucket("revokes")
        try:
            entry = await kv.get(f"{stream}.{durable}.{seq}")
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    def _is_live(self, delivery: Delivery) -> bool:
        """False for a delivery this process revoked or has since redelivered (a stale handle)."""
        if delivery.receipt in self._revoked:
            return False
        batch = self._batches.get((delivery.topic, delivery.group, delivery.partition))
        held = batch.receipts.get(delivery.offset + 1) if batch else None
        # Unknown here: another process read it; JetStream itself decides.
        return held is None or held == delivery.receipt

    def _forget(self, delivery: Delivery) -> None:
        batch = self._batches.get((delivery.topic, delivery.group, delivery.partition))
        if batch is not None:
            batch.receipts.pop(delivery.offset + 1, None)

    async def ack(self, delivery: Delivery) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._settle_replay(delivery, error=None)
            return
        if not self._is_live(delivery):
            return
        await self._respond(delivery.receipt, b"+ACK")
        self._forget(delivery)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """The acks sent together and awaited together: each is a request JetStream answers, and
        one after the other a pass of N deliveries waited N round trips before its next read.
        JetStream acks each message on its own (no cumulative ack), so their order does not matter."""
        replays = [d for d in deliveries if d.receipt.startswith(_DLQ_RECEIPT)]
        for delivery in replays:
            await self._settle_replay(delivery, error=None)
        live = [d for d in deliveries if not d.receipt.startswith(_DLQ_RECEIPT) and self._is_live(d)]
        results = await asyncio.gather(
            *(self._respond(d.receipt, b"+ACK") for d in live), return_exceptions=True
        )
        failed: BaseException | None = None
        for delivery, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                failed = failed or result
            else:
                self._forget(delivery)
        if failed is not None:
            raise failed

    async def nack(self, delivery: Delivery, *, error: str) -> None:
        if delivery.receipt.startswith(_DLQ_RECEIPT):
            await self._settle_replay(delivery, error=error)
            return
        if not self._is_live(delivery):
            return
        slot = (delivery.topic, delivery.group, delivery.partition)
        batch = self._batches.pop(slot, None)
        outstanding = dict(batch.receipts) if batch else {delivery.offset + 1: delivery.receipt}
        nak = b"-NAK"
        if self.retry_delay_s > 0:
            nak += b" " + orjson.dumps({"delay": int(self.retry_delay_s * 1e9)})
        stream = self._stream_name(delivery.topic)
        durable = self._durable(delivery.group, delivery.partition)
        # In sequence order: JetStream redelivers naked messages in the order it got the naks.
        for seq, receipt in sorted(outstanding.items()):
            if receipt == delivery.receipt:
                if delivery.attempt >= self.max_attempts:
                    msg = await self._fetch_stored(stream, seq)
                    await self._store_letter(
                        msg, delivery.group, delivery.topic, delivery.partition, seq, delivery.attempt, error
                    )
                    await self._respond(receipt, b"+TERM")
                else:
                    await self._respond(receipt, nak)
                continue
            # Revoked, not failed: its next delivery must not count as an attempt.
            kv = await self._bucket("revokes")
            key = f"{stream}.{durable}.{seq}"
            try:
                count = int((await kv.get(key)).value or b"0")
            except KeyNotFoundError:
                count = 0
            await kv.put(key, str(count + 1).encode())
            await self._respond(receipt, nak)
            self._revoked[receipt] = None
        self._revoked[delivery.receipt] = None
        while len(self._revoked) > _REVOKED_MEMORY:
            self._revoked.popitem(last=False)

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
        stream = await self._ensure_topic(topic)
        js = await self._js()
        last_seq = int((await js.stream_info(stream)).state.last_seq)
        for p in range(self.partitions) if partition is None else [partition]:
            subject = self._subject(topic, p)
            if from_offset is not None:
                start = from_offset + 1
            else:
                assert from_time is not None
                start = await self._first_seq_at(stream, subject, from_time, last_seq)
            durable = self._durable(group, p)
            # The consumer is the group's cursor: rewinding is recreating it at the new start.
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(stream, durable)
            self._consumers.discard((stream, durable))
            self._batches.pop((topic, group, p), None)
            await self._ensure_consumer(stream, durable, subject, start_seq=max(start, 1))

    async def _first_seq_at(self, stream: str, subject: str, moment: datetime, last_seq: int) -> int:
        """The first sequence on `subject` stamped at or after `moment`; a binary search over
        `get_msg(next_by_subj)`, O(log n) requests."""
        js = await self._js()
        target = int(moment.astimezone(UTC).timestamp() * 1000)
        lo, hi = 1, last_seq + 1
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                stored = await js.get_msg(stream, seq=mid, subject=subject, next=True)
            except NotFoundError:
                hi = mid
                continue
            stamp = int((stored.headers or {}).get(TIME_HEADER, "0"))
            if stamp >= target:
                hi = mid
            else:
                lo = int(stored.seq or mid) + 1
        return lo

    async def lag(self, topic: str, group: str) -> int:
        stream = await self._ensure_topic(topic)
        js = await self._js()
        total = 0
        for p in range(self.partitions):
            durable = self._durable(group, p)
            await self._ensure_consumer(stream, durable, self._subject(topic, p))
            info = await js.consumer_info(stream, durable)
            total += int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return total

    # ---- housekeeping --------------------------------------------------------------------------

    async def delete_all(self, topics: Sequence[str]) -> None:
        """Delete `topics`' streams and this prefix's DLQ streams (tests and benchmarks clean up)."""
        js = await self._js()
        names = [self._stream_name(t) for t in topics]
        names += [self._replay_stream, f"KV_{self.prefix}_dlq", f"KV_{self.prefix}_revokes"]
        for name in names:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
