"""Saga events into the transactional outbox, as CloudEvents (API-CONVENTIONS: Events)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message, Outbox


class OutboxEventSink:
    """Turns each event a step emits into an outbox message in the step's own transaction.

    `type` is the CloudEvents type (`mercato.orders.order_completed`); the topic is the type
    without its last word (`mercato.orders`); the subject and partition key is the aggregate id
    (`data["order_id"]`, else the saga id); the saga id is the causation id.
    """

    def __init__(self, outbox: Outbox, *, source: str, clock: Clock) -> None:
        self._outbox = outbox
        self._source = source
        self._clock = clock

    async def add(self, conn: AsyncConnection, events: Sequence[Mapping[str, Any]]) -> None:
        await self._outbox.add_many(conn, [self.message(event) for event in events])

    def message(self, event: Mapping[str, Any]) -> Message:
        event_type = str(event["type"])
        data = dict(event.get("data", {}))
        subject = str(data.get("order_id") or event["saga_id"])
        return Message(
            id=new_id(),
            source=self._source,
            type=event_type,
            subject=subject,
            time=self._clock.now(),
            data=data,
            topic=event_type.rsplit(".", 1)[0],
            key=subject,
            correlation_id=str(event.get("correlation_id") or "") or None,
            causation_id=str(event["saga_id"]),
        )
