"""The notifications handler's statement budget: one statement per consumer pass on the raw driver, and an
(event, channel) already recorded is skipped by its unique key, not by a read first."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.messaging import Message, SqlLogStream
from mercato.shop.notifications import NotificationsService
from mercato.shop.notifications.tables import notifications
from tests.integration.statement_budget import counting


def _completed(order_id: uuid.UUID) -> Message:
    return Message(
        id=uuid.uuid4(),
        source="/test",
        type="mercato.orders.order_completed",
        subject=str(order_id),
        time=datetime(2026, 12, 6, tzinfo=UTC),
        data={
            "order_id": str(order_id),
            "customer_id": str(uuid.uuid4()),
            "total_minor": 1250,
            "currency": "EUR",
        },
        topic="mercato.orders",
    )


async def test_an_event_is_one_statement_and_a_repeat_writes_nothing(container: Container) -> None:
    service = NotificationsService(container.db, container.clock)
    event = _completed(uuid.uuid4())
    with counting(container) as first:
        async with container.db.write() as conn:
            await service.handle(conn, event)
    # Was a SELECT of the channels already recorded, then an INSERT, through SQLAlchemy.
    assert len(first.statements) == 1, first.report()
    assert first.statements[0].startswith("driver: INSERT INTO notifications"), first.report()
    with counting(container) as again:
        async with container.db.write() as conn:
            await service.handle(conn, event)  # redelivered, inbox bypassed
    assert len(again.statements) == 1, again.report()
    async with container.db.read() as conn:
        count = (await conn.execute(select(func.count()).select_from(notifications))).scalar_one()
    assert count == 2  # the e-mail and the webhook, once each


async def test_a_consumer_pass_records_all_its_events_notifications_in_one_statement(
    container: Container, clock: ManualClock
) -> None:
    stream = SqlLogStream(container.db, partitions=8, visibility_timeout_s=10, clock=clock)
    reader = NotificationsService(container.db, container.clock).consumer(stream, name="budget")
    events = [_completed(uuid.uuid4()) for _ in range(5)]  # five orders: spread over partitions
    await stream.publish(events)

    with counting(container) as busy:
        assert await reader.run_once() == 5

    inserts = [sql for sql in busy.statements if "INTO notifications" in sql]
    # The batch handler: one INSERT for the pass's ten rows (was one per event).
    assert len(inserts) == 1, busy.report()
    async with container.db.read() as conn:
        count = (await conn.execute(select(func.count()).select_from(notifications))).scalar_one()
    assert count == 10  # each order's e-mail and webhook, once
