"""Saga events into the transactional outbox, as CloudEvents (API-CONVENTIONS: Events)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message, Outbox, StagedRows


class EventContract(Protocol):
    """The schema side of producing an event (e.g. `kit.schemas.SchemaCatalog`), injected so
    this module knows no schema files: validate `data` against the type's current schema and
    return the `dataschema` URI to stamp. Raises (a `ValueError`) when `data` does not match:
    the producer has a bug, and the event must not reach the outbox."""

    def dataschema_for(self, event_type: str, data: Mapping[str, Any]) -> str: ...


class OutboxEventSink:
    """Turns each event a step emits into an outbox message in the step's own transaction.

    `type` is the CloudEvents type (`mercato.orders.order_completed`); the topic is the type
    without its last word (`mercato.orders`); the subject and partition key is the aggregate id
    (`data["order_id"]`, else the saga id); the saga id is the causation id. With a `contract`,
    each event is validated and stamped with its schema version (`dataschema`) before it is written.
    """

    def __init__(
        self, outbox: Outbox, *, source: str, clock: Clock, contract: EventContract | None = None
    ) -> None:
        self._outbox = outbox
        self._source = source
        self._clock = clock
        self._contract = contract

    async def add(self, conn: AsyncConnection, events: Sequence[Mapping[str, Any]]) -> None:
        await self._outbox.add_many(conn, [self.message(event) for event in events])

    def stage(self, conn: AsyncConnection, events: Sequence[Mapping[str, Any]]) -> StagedRows | None:
        """The events as outbox rows for the saga's move to insert in its own statement (one
        statement for the move, its step record and its events on PostgreSQL); None: call `add`."""
        return self._outbox.stage(conn, [self.message(event) for event in events])

    def message(self, event: Mapping[str, Any]) -> Message:
        event_type = str(event["type"])
        data = dict(event.get("data", {}))
        subject = str(data.get("order_id") or event["saga_id"])
        dataschema = None if self._contract is None else self._contract.dataschema_for(event_type, data)
        return Message(
            id=new_id(),
            source=self._source,
            type=event_type,
            subject=subject,
            time=self._clock.now(),
            data=data,
            topic=event_type.rsplit(".", 1)[0],
            key=subject,
            dataschema=dataschema,
            correlation_id=str(event.get("correlation_id") or "") or None,
            causation_id=str(event["saga_id"]),
        )
