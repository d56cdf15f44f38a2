"""The `Broker` port: every API process hears every real-time event, whichever process produced it.

This is broadcast, not a work queue: each subscriber (one per process) gets each event published
after it subscribed. A broker is allowed to lose events (a process restart, a dropped broker
connection): every essential event is already durable in a `History` when it is published, and a
connection that sees seq N+2 after N refills N+1 from there (see `connection.py`). The broker only
has to be fast and, while connected, in publish order per publisher.

Adapters (ADR 0029): `SqlBroker` (a small append-only table polled by id: embedded mode and
PostgreSQL without a broker), `RedisBroker` (a capped Redis Stream read with XREAD, no group),
`NatsBroker` (core NATS publish/subscribe on one subject).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from mercato.kit.realtime.events import ChannelEvent

__all__ = ["Broker", "Subscription", "SubscriptionReaders"]


class Subscription:
    """Events from a broker, in arrival order, through a bounded buffer.

    If this process cannot keep up with the whole deployment's event rate the oldest buffered events
    are dropped (counted in `dropped`) rather than growing memory; connections refill from history.
    """

    def __init__(self, *, max_buffered: int = 10_000) -> None:
        self._queue: asyncio.Queue[ChannelEvent | None] = asyncio.Queue(maxsize=max_buffered)
        self.dropped = 0
        self._closed = False

    def put(self, event: ChannelEvent) -> None:
        if self._closed:
            return
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._queue.get_nowait()
                    self.dropped += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def get(self) -> ChannelEvent | None:
        """The next event; None once closed."""
        if self._closed and self._queue.empty():
            return None
        return await self._queue.get()

    async def __aiter__(self) -> AsyncIterator[ChannelEvent]:
        while (event := await self.get()) is not None:
            yield event


class SubscriptionReaders:
    """The reader task behind each subscription of an adapter that reads on its own (SQL, Redis):
    started with the subscription, cancelled when it is given back."""

    def __init__(self) -> None:
        self._tasks: dict[Subscription, asyncio.Task[None]] = {}

    def start(
        self, reader: Callable[[Subscription], Coroutine[Any, Any, None]], *, name: str
    ) -> Subscription:
        subscription = Subscription()
        self._tasks[subscription] = asyncio.create_task(reader(subscription), name=name)
        return subscription

    async def stop(self, subscription: Subscription) -> None:
        task = self._tasks.pop(subscription, None)
        subscription.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop_all(self) -> None:
        for subscription in list(self._tasks):
            await self.stop(subscription)


class Broker(Protocol):
    async def publish(self, event: ChannelEvent) -> None:
        """Hand `event` to every current subscriber of every process (including this one)."""
        ...

    async def publish_many(self, events: list[ChannelEvent]) -> None:
        """`publish` each, in order; adapters send them in one round trip (a persisted batch)."""
        ...

    async def subscribe(self) -> Subscription:
        """Start hearing events; when this returns, every later `publish` reaches the subscription."""
        ...

    async def unsubscribe(self, subscription: Subscription) -> None: ...

    async def aclose(self) -> None: ...
