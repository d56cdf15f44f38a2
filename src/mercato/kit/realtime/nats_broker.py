"""`NatsBroker`: the broker port over core NATS publish/subscribe on one subject.

Core NATS rather than a JetStream consumer: the durable copy of every essential event is already in
the channel history, so the broker only needs low latency to every process; a message lost while a
process is disconnected from NATS is refilled from history by the seq-gap check (ADR 0029).
The client connects lazily on first use, like `JetStreamStream`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from mercato.kit.realtime.broker import Subscription
from mercato.kit.realtime.events import ChannelEvent

__all__ = ["NatsBroker"]


class NatsBroker:
    def __init__(self, *, servers: str, subject: str = "mercato.realtime") -> None:
        self._servers = servers
        self.subject = subject
        self._nc: NatsClient | None = None
        self._lock = asyncio.Lock()
        self._subs: dict[Subscription, Any] = {}

    async def _client(self) -> NatsClient:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await nats.connect(
                    servers=self._servers.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5
                )
            return self._nc

    async def publish(self, event: ChannelEvent) -> None:
        nc = await self._client()
        await nc.publish(self.subject, event.to_bytes())

    async def publish_many(self, events: list[ChannelEvent]) -> None:
        nc = await self._client()
        for event in events:
            # Buffered by the client and written in order; no per-event round trip to wait for.
            await nc.publish(self.subject, event.to_bytes())

    async def subscribe(self) -> Subscription:
        nc = await self._client()
        subscription = Subscription()

        async def on_message(msg: Any) -> None:
            subscription.put(ChannelEvent.from_bytes(msg.data))

        self._subs[subscription] = await nc.subscribe(self.subject, cb=on_message)
        # The SUB has reached the server once a flush returns: later publishes are delivered.
        await nc.flush(timeout=5)
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        sub = self._subs.pop(subscription, None)
        subscription.close()
        if sub is not None and self._nc is not None and not self._nc.is_closed:
            await sub.unsubscribe()

    async def aclose(self) -> None:
        for subscription in list(self._subs):
            await self.unsubscribe(subscription)
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self._nc = None
