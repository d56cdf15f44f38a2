"""The groundwork `JetStreamStream` stands on: its configuration and in-process state, the lazy NATS
connection, the names of streams, subjects and consumers, creating streams, consumers and KV buckets,
the no-wait pull, and acks sent as requests. Nothing here reads, settles or dead-letters a message:
consuming is in `nats_jetstream.py`, dead letters in `nats_jetstream_dead_letters.py`.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.messaging.hooks import MessagingHook, NullMessagingHook

__all__ = ["TIME_HEADER", "Batch", "JetStreamCore", "token"]

# The publisher's clock (ms) on every message: what replay by time searches.
TIME_HEADER = "Mercato-Time"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str) -> str:
    """A stream/consumer-name-safe token for `name` (dots, spaces and wildcards are not allowed)."""
    return _UNSAFE.sub("_", name)


@dataclass
class Batch:
    """What this process has out for one (topic, group, partition): sequence -> receipt."""

    deadline: float
    receipts: dict[int, str] = field(default_factory=dict)


class JetStreamCore:
    """Configuration, connection and resource creation shared by `JetStreamStream`'s parts (see
    `JetStreamStream` for what the arguments mean)."""

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
        if token(prefix) != prefix:
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
        self._batches: dict[tuple[str, str, int], Batch] = {}
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
        return f"{self.prefix}_{token(topic)}"

    def _subject(self, topic: str, partition: int) -> str:
        return f"{self.prefix}.{topic}.{partition}"

    @staticmethod
    def _durable(group: str, partition: int) -> str:
        return f"{token(group)}-p{partition}"

    # ---- streams, consumers and buckets --------------------------------------------------------

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

    # ---- pulling and acking --------------------------------------------------------------------

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

    async def _respond(self, receipt: str, payload: bytes) -> None:
        # As a request: JetStream answers once the ack is processed, so lag and redelivery see it.
        await self._nc.request(receipt, payload, timeout=self.request_timeout_s)

    async def _fetch_stored(self, stream: str, seq: int) -> bytes:
        js = await self._js()
        stored = await js.get_msg(stream, seq)
        return bytes(stored.data or b"")
