"""`RedisBroker`: the broker port over one capped Redis Stream, read with XREAD (no consumer group).

A Redis Stream rather than PUBLISH/SUBSCRIBE: a subscriber whose connection drops reconnects and
resumes from the last entry id it read, so a blip loses nothing that is still inside the cap
(`max_len`, trimmed approximately with XADD MAXLEN ~). Each process reads the whole stream: this is
fan-out to every process, not a work queue (ADR 0029).
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from mercato.kit.observability import get_logger
from mercato.kit.realtime.broker import Subscription, SubscriptionReaders
from mercato.kit.realtime.events import ChannelEvent

__all__ = ["RedisBroker"]

_log = get_logger("mercato.realtime.redis_broker")


class RedisBroker:
    def __init__(
        self, redis: Redis, *, key: str = "mercato:realtime", max_len: int = 100_000, block_s: float = 1.0
    ) -> None:
        self._redis = redis
        self.key = key
        self.max_len = max_len
        self.block_s = block_s
        self._readers = SubscriptionReaders()

    async def publish(self, event: ChannelEvent) -> None:
        await self._redis.xadd(self.key, {"e": event.to_bytes()}, maxlen=self.max_len, approximate=True)

    async def publish_many(self, events: list[ChannelEvent]) -> None:
        """Events in order, one round trip (a non-transactional pipeline: XADDs keep their order)."""
        if not events:
            return
        pipe = self._redis.pipeline(transaction=False)
        self.queue_publish(pipe, events)
        await pipe.execute()

    def queue_publish(self, pipe: Pipeline, events: list[ChannelEvent]) -> None:
        """`publish_many`'s XADDs, queued on `pipe` (sent when the caller executes it). The chat
        persister's publish goes through `RedisStream.append_ack_read` instead (ADR 0086)."""
        for event in events:
            pipe.xadd(self.key, {"e": event.to_bytes()}, maxlen=self.max_len, approximate=True)

    def shares_database(self, other: Redis) -> bool:
        """`other` reaches the same Redis server and database as this broker's client."""
        mine, theirs = self._redis.connection_pool.connection_kwargs, other.connection_pool.connection_kwargs
        return all(
            mine.get(name) == theirs.get(name) for name in ("host", "port", "path", "db", "username")
        ) and type(self._redis.connection_pool) is type(other.connection_pool)

    async def subscribe(self) -> Subscription:
        last: Any = await self._redis.xrevrange(self.key, count=1)
        start: bytes = last[0][0] if last else b"0-0"
        return self._readers.start(
            lambda subscription: self._read(subscription, start), name="realtime-redis"
        )

    async def unsubscribe(self, subscription: Subscription) -> None:
        await self._readers.stop(subscription)

    async def aclose(self) -> None:
        await self._readers.stop_all()
        await self._redis.aclose()

    async def _read(self, subscription: Subscription, last_id: bytes | str) -> None:
        while True:
            try:
                answer = await self._redis.xread(
                    {self.key: last_id}, count=500, block=int(self.block_s * 1000)
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis away: retry, and resume from the last id read
                _log.exception("redis_broker_read_failed")
                await asyncio.sleep(0.5)
                continue
            streams: Any = answer or []
            for _stream, entries in streams:
                for entry_id, fields in entries:
                    last_id = entry_id
                    payload = fields.get(b"e") or fields.get("e")
                    if payload is not None:
                        subscription.put(ChannelEvent.from_bytes(payload))
