"""How an invalidation in one process reaches the local tiers of all the others.

`RedisInvalidationBus` publishes on one Redis pub/sub channel; every process runs one listener
task (`start`/`aclose`, from the app's lifespan) that hands each message to the cache it names.
Pub/sub is fire-and-forget: a process that is disconnected at that moment misses the message,
which is why local entries are only fresh for `CacheTtls.local_fresh_s` (the bound on staleness
when a message is lost) and why the listener drops its whole local tier after reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from mercato.kit.observability import get_logger

__all__ = ["InvalidationBus", "RedisInvalidationBus"]

Listener = Callable[[str | None], Awaitable[None]]
_log = get_logger("mercato.cache.bus")


class InvalidationBus(Protocol):
    def subscribe(self, cache: str, listener: Listener) -> None:
        """`listener(key)` runs for each invalidation of `cache` published by another process
        (`key` None: the whole cache)."""
        ...

    async def publish(self, cache: str, key: str | None) -> None: ...


class RedisInvalidationBus:
    def __init__(self, redis: Redis, *, channel: str = "mercato:cache:invalidate") -> None:
        self._redis = redis
        self._channel = channel
        self._origin = uuid.uuid4().hex
        self._listeners: dict[str, list[Listener]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    def subscribe(self, cache: str, listener: Listener) -> None:
        self._listeners.setdefault(cache, []).append(listener)

    async def publish(self, cache: str, key: str | None) -> None:
        payload = orjson.dumps({"o": self._origin, "c": cache, "k": key})
        await self._redis.publish(self._channel, payload)

    async def start(self, *, timeout_s: float = 5.0) -> None:
        """Start listening; returns once subscribed (or after `timeout_s`, still retrying)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        first = True
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    if not first:
                        # Messages may have been missed while disconnected: forget everything local.
                        await self._dispatch_all(None)
                    first = False
                    self._ready.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._handle(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:  # a dropped connection: retry, never kill the process
                _log.warning("cache_bus_disconnected", error=str(exc))
                await asyncio.sleep(0.5)

    async def _handle(self, raw: bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if message.get("o") == self._origin:
            return
        for listener in self._listeners.get(str(message.get("c")), []):
            await listener(message.get("k"))

    async def _dispatch_all(self, key: str | None) -> None:
        for listeners in self._listeners.values():
            for listener in listeners:
                await listener(key)
