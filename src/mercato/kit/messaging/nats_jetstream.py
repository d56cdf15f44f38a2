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
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType
from nats.js.errors import BadRequestError, KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

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

__all__ = ["JetStreamStream"]

_DLQ_RECEIPT = DEAD_LETTER_RECEIPT_PREFIX
_TIME_HEADER = "Mercato-Time"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_REVOKED_MEMORY = 10_000


def _token(name: str) -> str:
    """A stream/consumer-name-safe token for `name` (dots, spaces and wildcards are not allowed)."""
    return _UNSAFE.sub("_", name)


@dataclass
class _Batch:
    """What this process has out for one (topic, group, partition): sequence -> receipt."""

    deadline: float
    receipts: dict[int, str] = field(default_factory=dict)


class JetStreamStream:
    """The `Stream` port on NATS JetStream. Configuration applies to every topic and group it serves.

    Give a connected `client`, or `servers` to connect lazily on first use (then `aclose` closes it).
    `visibility_timeout_s` becomes the consumers' `AckWait`, timed by the server. `replicas` is each
    stream's and bucket's replication factor on a JetStream cluster (3 in `mercato cluster`). `clock` stamps
    messages (replay by time) and dead letters. `replay_check_interval_s` bounds how often a read also
    looks for dead letters an operator queued from another process.
    """

    def __init__(
        self,
        *,
        client: NatsClient | None = None,
        servers: str | list[str] | None = None,
        prefix: str = "mercato",
        partitions: int = 8,
        visibility_timeout_s: float = 30.0,
        max_attempts: int = 5,
        retry_delay_s: float = 0.0,
        poll_interval_s: float = 0.05,
        dedup_window_s: float = 86_400.0,
        request_timeout_s: float = 5.0,
        replay_check_interval_s: float = 1.0,
        replicas: int = 1,
        clock: Clock | None = None,
        hook: MessagingHook | None = None,
    ) -> None:
        if (client is None) == (servers is None):
            raise ValueError("give exactly one of client and servers")
        if partitions < 1 or max_attempts < 1 or visibility_timeout_s <= 0 or dedup_window_s <= 0:
            raise ValueError("partitions and max_attempts must be >= 1, timeouts > 0")
        if _token(prefix) != prefix:
            raise ValueError("prefix must be letters, digits, '_' or '-'")
        self._client = client
        self._servers = servers
        self.prefix = prefix
        self.partitions = partitions
        self.visibility_timeout_s = visibility_timeout_s
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.poll_interval_s = poll_interval_s
        self.dedup_window_s = dedup_window_s
        self.request_timeout_s = request_timeout_s
        self.replay_check_interval_s = replay_check_interval_s
        # Copies of every stream and bucket a JetStream cluster keeps (R3 survives one node lost).
        self.replicas = replicas
        self._clock = clock or SystemClock()
        self._hook = hook or NullMessagingHook()
        self._connect_lock = asyncio.Lock()
        self._js_ctx: JetStreamContext | None = None
        self._streams: set[str] = set()
        self._consumers: set[tuple[str, str]] = set()
        self._kv: dict[str, KeyValue] = {}
        self._batches: dict[tuple[str, str, int], _Batch] = {}
        self._locks: dict[tuple[str, str, int], asyncio.Lock] = {}
        self._revoked: OrderedDict[str, None] = OrderedDict()
        self._replay_checked: dict[tuple[str, str], float] = {}
        self._pull_subs: dict[tuple[str, str], Subscription] = {}
        self._pull_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._next_start = 0

    # ---- connection and names ------------------------------------------------------------------

    async def _js(self) -> JetStreamContext:
        if self._js_ctx is not None:
            return self._js_ctx
        async with self._connect_lock:
            if self._js_ctx is None:
                if self._client is None:
                    assert self._servers is not None
                    self._client = await nats.connect(self._servers, connect_timeout=self.request_timeout_s)
                self._js_ctx = self._client.jetstream(timeout=self.request_timeout_s)
        return self._js_ctx

    @property
    def _nc(self) -> NatsClient:
        assert self._client is not None
        return self._client

    async def aclose(self) -> None:
        """Close the connection if this stream opened it."""
        if self._servers is not None and self._client is not None and not self._client.is_closed:
            await self._client.drain()

    def _stream_name(self, topic: str) -> str:
        return f"{self.prefix}_{_token(topic)}"

    def _subject(self, topic: str, partition: int) -> str:
        return f"{self.prefix}.{topic}.{partition}"

    @staticmethod
    def _durable(group: str, partition: int) -> str:
        return f"{_token(group)}-p{partition}"

    @property
    def _replay_stream(self) -> str:
        return f"{self.prefix}_dlqreplay"

    def _replay_subject(self, topic: str, group: str) -> str:
        return f"{self.prefix}.dlqreplay.{_token(topic)}.{_token(group)}"

    async def _ensure_stream(self, name: str, subjects: list[str], **config: Any) -> None:
        if name in self._streams:
            return
        js = await self._js()
        try:
            await js.add_stream(
                name=name, subjects=subjects, storage=StorageType.FILE, num_replicas=self.replicas, **config
            )
        except BadRequestError:
            # Already there (another process made it, perhaps with other limits): use it as it is.
            await js.stream_info(name)
        self._streams.add(name)

    async def _ensure_topic(self, topic: str) -> str:
        name = self._stream_name(topic)
        await self._ensure_stream(name, [f"{self.prefix}.{topic}.*"], duplicate_window=self.dedup_window_s)
        return name

    async def _ensure_consumer(
        self, stream: str, durable: str, subject: str, *, start_seq: int | None = None
    ) -> None:
        if start_seq is None and (stream, durable) in self._consumers:
            return
        js = await self._js()
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.visibility_timeout_s,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
        )
        try:
            await js.add_consumer(stream, config)
        except BadRequestError:
            await js.consumer_info(stream, durable)
        self._consumers.add((stream, durable))

    async def _bucket(self, suffix: str) -> KeyValue:
        kv = self._kv.get(suffix)
        if kv is None:
            js = await self._js()
            bucket = f"{self.prefix}_{suffix}"
            try:
                kv = await js.key_value(bucket)
            except (NotFoundError, BadRequestError):
                kv = await js.create_key_value(
                    bucket=bucket, storage=StorageType.FILE, replicas=self.replicas
                )
            self._kv[suffix] = kv
        return kv

    # ---- publishing ----------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        """Pipelined: every message is sent, in order, before any PubAck is awaited (one connection
        keeps the order per partition); returns once the server stored every one of them."""
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
                headers={"Nats-Msg-Id": str(m.id), _TIME_HEADER: stamp},
            )
            for m in messages
        ]
        await asyncio.gather(*acks)

    # ---- consuming -----------------------------------------------------------------------------

    async def _pull(self, stream: str, durable: str, batch: int) -> list[Msg]:
        """One no-wait pull request: what the consumer has ready now, up to `batch`.

        JetStream delivers pulled messages under their own subjects, so replies are told apart by
        subscription: one inbox per consumer, and one pull at a time on it."""
        slot = (stream, durable)
        lock = self._pull_locks.setdefault(slot, asyncio.Lock())
        async with lock:
            sub = self._pull_subs.get(slot)
            if sub is None:
                sub = await self._nc.subscribe(self._nc.new_inbox())
                self._pull_subs[slot] = sub
            # A reply that came after an earlier pull gave up: that delivery is redelivered after
            # AckWait, so dropping it loses nothing.
            while sub.pending_msgs:
                await sub.next_msg(timeout=self.request_timeout_s)
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                orjson.dumps({"batch": batch, "no_wait": True}),
                reply=sub.subject,
            )
            out: list[Msg] = []
            while len(out) < batch:
                msg = await sub.next_msg(timeout=self.request_timeout_s)
                if JetStreamContext.is_status_msg(msg):
                    break  # 404 no messages / 408 nothing more now
                out.append(msg)
            return out

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
        batch = _Batch(deadline=time.monotonic() + self.visibility_timeout_s)
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

    async def _respond(self, receipt: str, payload: bytes) -> None:
        # As a request: JetStream answers once the ack is processed, so lag and redelivery see it.
        await self._nc.request(receipt, payload, timeout=self.request_timeout_s)

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

    async def _fetch_stored(self, stream: str, seq: int) -> bytes:
        js = await self._js()
        stored = await js.get_msg(stream, seq)
        return bytes(stored.data or b"")

    async def _dead_letter(
        self, msg: Msg, group: str, topic: str, partition: int, attempts: int, error: str
    ) -> None:
        seq = msg.metadata.sequence.stream
        await self._store_letter(msg.data, group, topic, partition, seq, attempts, error)
        await self._respond(msg.reply, b"+TERM")

    async def _store_letter(
        self, envelope: bytes, group: str, topic: str, partition: int, seq: int, attempts: int, error: str
    ) -> None:
        letter_id = str(new_id())
        letter = {
            "id": letter_id,
            "group": group,
            "topic": topic,
            "partition": partition,
            "offset": seq - 1,
            "envelope": envelope.decode(),
            "attempts": attempts,
            "last_error": error[:4000],
            "dead_at": self._clock.now().isoformat(),
            "status": DeadLetterStatus.DEAD.value,
            "replayed_at": None,
        }
        kv = await self._bucket("dlq")
        await kv.put(letter_id, orjson.dumps(letter))
        self._hook.dead_lettered(group=group, topic=topic)

    # ---- dead letters --------------------------------------------------------------------------

    async def _take_replays(self, topic: str, group: str, consumer: str, limit: int) -> list[Delivery]:
        now = time.monotonic()
        if now - self._replay_checked.get((topic, group), float("-inf")) < self.replay_check_interval_s:
            return []
        self._replay_checked[(topic, group)] = now
        await self._ensure_replay_stream()
        durable = f"dlq-{_token(topic)}-{_token(group)}"
        await self._ensure_consumer(self._replay_stream, durable, self._replay_subject(topic, group))
        out: list[Delivery] = []
        kv = await self._bucket("dlq")
        for msg in await self._pull(self._replay_stream, durable, limit):
            letter_id = msg.data.decode()
            try:
                letter = orjson.loads((await kv.get(letter_id)).value or b"{}")
            except KeyNotFoundError:
                letter = {}
            if letter.get("status") != DeadLetterStatus.REPLAYING.value:
                await self._respond(msg.reply, b"+ACK")
                continue
            out.append(
                Delivery(
                    message=Message.from_json(letter["envelope"]),
                    topic=topic,
                    group=group,
                    consumer=consumer,
                    partition=int(letter["partition"]),
                    offset=int(letter["offset"]),
                    attempt=int(letter["attempts"]) + 1,
                    receipt=f"{_DLQ_RECEIPT}{letter_id}|{msg.reply}",
                )
            )
        if out:
            # More may be queued behind these: look again on the next read.
            self._replay_checked.pop((topic, group), None)
        return out

    async def _ensure_replay_stream(self) -> None:
        await self._ensure_stream(
            self._replay_stream,
            [f"{self.prefix}.dlqreplay.>"],
            retention=RetentionPolicy.WORK_QUEUE,
        )

    async def _settle_replay(self, delivery: Delivery, *, error: str | None) -> None:
        letter_id, reply = delivery.receipt.removeprefix(_DLQ_RECEIPT).split("|", 1)
        kv = await self._bucket("dlq")
        try:
            entry = await kv.get(letter_id)
        except KeyNotFoundError:
            return
        letter = orjson.loads(entry.value or b"{}")
        if letter.get("status") != DeadLetterStatus.REPLAYING.value:
            return
        now = self._clock.now().isoformat()
        if error is None:
            letter.update(status=DeadLetterStatus.REPLAYED.value, replayed_at=now)
        else:
            # A replay that fails goes straight back to the queue: it already used its attempts.
            letter.update(
                status=DeadLetterStatus.DEAD.value,
                attempts=int(letter["attempts"]) + 1,
                last_error=error[:4000],
                dead_at=now,
            )
        # Compare-and-set on the revision: a concurrent settle of the same letter loses cleanly.
        await kv.update(letter_id, orjson.dumps(letter), last=entry.revision)
        await self._respond(reply, b"+ACK")
        if error is not None:
            self._hook.dead_lettered(group=delivery.group, topic=delivery.topic)

    async def _letters(self) -> list[tuple[dict[str, Any], int]]:
        kv = await self._bucket("dlq")
        try:
            keys = await kv.keys()
        except NoKeysError:
            return []
        out = []
        for key in sorted(keys):  # UUIDv7 strings: lexical order is dead order
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            out.append((orjson.loads(entry.value or b"{}"), entry.revision or 0))
        return out

    async def dead_letters(
        self, *, topic: str | None = None, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        out = []
        for letter, _ in await self._letters():
            if (topic is None or letter["topic"] == topic) and (group is None or letter["group"] == group):
                out.append(_dead_letter(letter))
                if len(out) >= limit:
                    break
        return out

    async def dead_letter(self, dead_letter_id: uuid.UUID) -> DeadLetter | None:
        kv = await self._bucket("dlq")
        try:
            entry = await kv.get(str(dead_letter_id))
        except KeyNotFoundError:
            return None
        return _dead_letter(orjson.loads(entry.value or b"{}"))

    async def replay_dead_letters(
        self, *, ids: Sequence[uuid.UUID] | None = None, topic: str | None = None
    ) -> int:
        wanted = None if ids is None else {str(i) for i in ids}
        allowed = {DeadLetterStatus.DEAD.value}
        if ids is not None:
            # Named explicitly: a letter already replayed once may be replayed again.
            allowed.add(DeadLetterStatus.REPLAYED.value)
        await self._ensure_replay_stream()
        js = await self._js()
        kv = await self._bucket("dlq")
        queued = 0
        for letter, revision in await self._letters():
            if wanted is not None and letter["id"] not in wanted:
                continue
            if letter["status"] not in allowed or (topic is not None and letter["topic"] != topic):
                continue
            letter["status"] = DeadLetterStatus.REPLAYING.value
            await kv.update(letter["id"], orjson.dumps(letter), last=revision)
            await js.publish(self._replay_subject(letter["topic"], letter["group"]), letter["id"].encode())
            self._replay_checked.pop((letter["topic"], letter["group"]), None)
            queued += 1
        return queued

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
            stamp = int((stored.headers or {}).get(_TIME_HEADER, "0"))
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


def _dead_letter(letter: dict[str, Any]) -> DeadLetter:
    return DeadLetter(
        id=uuid.UUID(letter["id"]),
        group=letter["group"],
        topic=letter["topic"],
        partition=int(letter["partition"]),
        offset=int(letter["offset"]),
        message=Message.from_json(letter["envelope"]),
        attempts=int(letter["attempts"]),
        last_error=letter["last_error"],
        dead_at=datetime.fromisoformat(letter["dead_at"]),
        status=DeadLetterStatus(letter["status"]),
        replayed_at=datetime.fromisoformat(letter["replayed_at"]) if letter["replayed_at"] else None,
    )
