"""Which backend serves each port — stream, real-time broker and hub, product cache — chosen from
the settings alone; part of the composition root (nothing else branches on the backend)."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis

from mercato.config import Settings
from mercato.kit.cache import (
    Cache,
    CacheTtls,
    MemoryTier,
    PrometheusCacheHooks,
    RedisInvalidationBus,
    RedisTier,
    TinyLfuStore,
)
from mercato.kit.clock import Clock
from mercato.kit.messaging import (
    Delivery,
    JetStreamStream,
    MessagingHook,
    RedisStream,
    SqlLogStream,
    Stream,
)
from mercato.kit.messaging.redis_client import redis_client
from mercato.kit.messaging.redis_streams import ReadNext
from mercato.kit.realtime import (
    Broker,
    ChannelEvent,
    HistoryGate,
    Hub,
    NatsBroker,
    PrometheusRealtimeHook,
    RedisBroker,
    SqlBroker,
    SqlChannelHistory,
)
from mercato.kit.storage import Database
from mercato.shop.catalog.api import product_body
from mercato.shop.catalog.cache import ProductCache
from mercato.shop.catalog.service import CatalogService
from mercato.shop.chat.service import CHAT_SENDS, CHAT_TOPIC, ChatHistory, ChatService, PublishAndAck


def cache_redis_url(settings: Settings) -> str | None:
    """The Redis of the cache's shared tier, or None for memory only. `auto` follows the rate
    limiter's and the stream's choice: Redis when either is configured on it."""
    cache = settings.cache
    if cache.backend == "memory":
        return None
    fallback = None
    if settings.ratelimit.backend == "redis":
        fallback = settings.ratelimit.redis_url
    elif settings.messaging.backend == "redis":
        fallback = settings.messaging.redis_url
    if cache.backend == "redis":
        return cache.redis_url or fallback or settings.ratelimit.redis_url
    return cache.redis_url or fallback


def build_product_cache(
    settings: Settings, catalog: CatalogService, *, clock: Clock, registry: CollectorRegistry
) -> tuple[ProductCache | None, RedisInvalidationBus | None, Redis | None]:
    """The product cache: a memory tier (LRU or W-TinyLFU, bounded by bytes) and, when Redis is
    configured, a Redis tier and the pub/sub bus. Connects lazily: no I/O here."""
    cache = settings.cache
    if not cache.enabled:
        return None, None, None
    hooks = PrometheusCacheHooks(registry)
    # W-TinyLFU's sketch is sized for ~1 KiB values (a product body is 0.5-2 KiB).
    expected = max(1000, cache.memory_max_bytes // 1024)
    store = (
        TinyLfuStore(max_bytes=cache.memory_max_bytes, expected_entries=expected)
        if cache.policy == "tinylfu"
        else None
    )
    local = MemoryTier(store, max_bytes=cache.memory_max_bytes, clock=clock, hooks=hooks)
    url = cache_redis_url(settings)
    redis = bus = shared = None
    if url is not None:
        redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(url, max_connections=64, timeout=1.0),
            socket_timeout=0.25,
            socket_connect_timeout=0.25,
        )
        shared = RedisTier(redis, prefix=cache.key_prefix, clock=clock)
        bus = RedisInvalidationBus(redis, channel=f"{cache.key_prefix}:invalidate")
    ttls = CacheTtls(
        fresh_s=cache.fresh_s,
        stale_while_revalidate_s=cache.stale_while_revalidate_s,
        stale_if_error_s=cache.stale_if_error_s,
        negative_s=cache.negative_s,
        local_fresh_s=cache.local_fresh_s,
    )
    products = Cache("products", local=local, shared=shared, ttls=ttls, bus=bus, clock=clock, hooks=hooks)
    product_cache = ProductCache(catalog, products, render=product_body)
    catalog.on_change(product_cache.invalidate)
    return product_cache, bus, redis


def build_stream(
    settings: Settings, db: Database, *, clock: Clock, hook: MessagingHook | None = None
) -> Stream:
    """The configured `Stream` backend; the SQL log by default, so embedded mode needs no server.
    Broker clients connect lazily, on first use: building the container does no I/O."""
    messaging = settings.messaging
    common: dict[str, Any] = {
        "partitions": messaging.partitions,
        "visibility_timeout_s": messaging.visibility_timeout_s,
        "max_attempts": messaging.max_attempts,
        "clock": clock,
        "hook": hook,
    }
    if messaging.backend == "redis":
        return RedisStream(
            redis_client(messaging.redis_url),
            prefix=f"{messaging.broker_prefix}:stream",
            dedup_window_s=messaging.dedup_window_s,
            **common,
        )
    if messaging.backend == "nats":
        return JetStreamStream(
            servers=messaging.nats_url.split(","),
            prefix=messaging.broker_prefix,
            replicas=messaging.nats_replicas,
            dedup_window_s=float(messaging.dedup_window_s),
            **common,
        )
    # A chat send wakes only the chat persisters (which wait on CHAT_SENDS), not the order feed.
    return SqlLogStream(db, topic_signals={CHAT_TOPIC: CHAT_SENDS}, **common)


class ChannelHistories:
    """The `History` port per channel kind: chat rooms in the chat tables, the rest (order:<id>) in
    the real-time channel history."""

    def __init__(self, chat: ChatHistory, other: SqlChannelHistory) -> None:
        self._chat = chat
        self._other = other

    async def head(self, channel: str) -> int:
        if channel.startswith("room:"):
            return await self._chat.head(channel)
        return await self._other.head(channel)

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        if channel.startswith("room:"):
            return await self._chat.after(channel, seq, limit=limit)
        return await self._other.after(channel, seq, limit=limit)


def build_broker(settings: Settings, db: Database) -> Broker:
    """The real-time broker on the configured messaging backend (ADR 0029); no I/O until started."""
    messaging = settings.messaging
    if messaging.backend == "redis":
        return RedisBroker(redis_client(messaging.redis_url), key=f"{messaging.broker_prefix}:realtime")
    if messaging.backend == "nats":
        return NatsBroker(servers=messaging.nats_url, subject=f"{messaging.broker_prefix}.realtime")
    return SqlBroker(db)


def publish_and_ack(hub: Hub, stream: Stream) -> PublishAndAck | None:
    """The chat persister's publish and acks in one Redis round trip (one script: the broker's
    XADDs, the stream's acks and, when asked, its next read; ADR 0082, 0086) when the broker and the
    stream share a Redis server and database; None otherwise (two calls, as before)."""
    broker = hub.broker
    if not (
        isinstance(broker, RedisBroker)
        and isinstance(stream, RedisStream)
        and broker.shares_database(stream.client)
    ):
        return None

    async def both(
        events: list[ChannelEvent], deliveries: list[Delivery], read_next: ReadNext | None
    ) -> list[Delivery] | None:
        payloads = [event.to_bytes() for event in events]
        return await stream.append_ack_read(
            broker.key, broker.max_len, payloads, deliveries, read_next=read_next
        )

    return both


def build_hub(
    settings: Settings,
    db: Database,
    *,
    chat: ChatService,
    channel_history: SqlChannelHistory,
    registry: CollectorRegistry,
) -> Hub:
    realtime = settings.realtime
    hook = PrometheusRealtimeHook(registry)
    hub = Hub(
        build_broker(settings, db),
        ChannelHistories(ChatHistory(chat), channel_history),
        node_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        hook=hook,
        presence_interval_s=realtime.presence_interval_s,
        presence_ttl_s=realtime.presence_ttl_s,
        max_messages=realtime.queue_max_messages,
        max_bytes=realtime.queue_max_bytes,
        bounded=realtime.backpressure,
        history_gate=HistoryGate(
            concurrency=realtime.history_reads or max(1, settings.database.pool_size // 2),
            wait_s=realtime.history_read_wait_s,
        ),
    )
    hook.watch_queued(hub.queued_bytes)
    return hub
