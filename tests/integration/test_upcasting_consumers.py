"""Every consumer of the running system reads events as their current schema version.

A stored v1 `order_completed` (written before v2, no `dataschema`, no `completed_at`, no unit
prices) and a new v2 one are published side by side; each consumer the worker runs (both reporting
projections on the SQL log and on Redis Streams, the payment ledger, notifications) must hand its
handler both as v2. The handlers are the real ones, wrapped to record what they were given; the
reader is what the services and projections wire themselves, so dropping it fails these tests.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, date, datetime

import pytest
from redis.asyncio import Redis
from sqlalchemy import Table, delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container, build_container
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message, RedisStream, Stream
from mercato.kit.projections import Projection, Projector, StreamProjector
from mercato.shop.notifications import NotificationsService
from mercato.shop.reporting import PROJECTIONS
from mercato.shop.reporting.tables import sales_by_day
from tests.conftest import make_settings
from tests.tables import emptiable_tables

REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
COMPLETED = "mercato.orders.order_completed"
V2 = f"/schemas/{COMPLETED}/v2"
CAPTURED = "mercato.payments.payment_captured"
# Days no other test files sales under, so the sales rows checked here are these events' alone.
V1_DAY, V2_DAY = date(2001, 2, 3), date(2001, 2, 4)


def completed_events() -> tuple[Message, Message]:
    """(stored v1, new v2): both order_completed, the v1 one as an old producer wrote it."""
    common = {"customer_id": str(uuid.uuid4()), "total_minor": 1250, "currency": "XTS"}
    v1 = Message(
        id=new_id(),
        source="test/old-producer",
        type=COMPLETED,
        subject=(v1_order := str(uuid.uuid4())),
        time=datetime(2001, 2, 3, 10, tzinfo=UTC),
        data={"order_id": v1_order, **common, "items": [{"sku": "SKU-V1", "quantity": 1}]},
        topic="mercato.orders",
    )
    v2 = Message(
        id=new_id(),
        source="test/new-producer",
        type=COMPLETED,
        subject=(v2_order := str(uuid.uuid4())),
        # Published just after midnight; the order completed the evening before (its own time).
        time=datetime(2001, 2, 5, 0, 0, 1, tzinfo=UTC),
        data={
            "order_id": v2_order,
            **common,
            "items": [{"sku": "SKU-V2", "quantity": 1, "unit_price_minor": 1250}],
            "completed_at": "2001-02-04T23:59:59Z",
        },
        topic="mercato.orders",
        dataschema=V2,
    )
    return v1, v2


def captured_v1() -> Message:
    order_id = str(uuid.uuid4())
    return Message(
        id=new_id(),
        source="test/old-producer",
        type=CAPTURED,
        subject=order_id,
        time=datetime(2001, 2, 3, 9, tzinfo=UTC),
        data={
            "order_id": order_id,
            "authorization_id": "auth-1",
            "capture_id": "cap-1",
            "amount_minor": 1250,
            "currency": "XTS",
        },
        topic="mercato.payments",
    )


def assert_current(seen: Sequence[Message]) -> None:
    """Both completions arrived as v2: stamped so, and shaped so (v1's new fields null)."""
    assert len(seen) == 2, seen
    for message in seen:
        assert message.dataschema == V2
        assert "completed_at" in message.data
        assert all("unit_price_minor" in item for item in message.data["items"])
    # Partitions interleave freely: tell the two apart by what the producer wrote.
    by_source = {m.source: m.data for m in seen}
    assert by_source["test/old-producer"]["completed_at"] is None
    assert by_source["test/old-producer"]["items"][0]["unit_price_minor"] is None
    assert by_source["test/new-producer"]["completed_at"] == "2001-02-04T23:59:59Z"


def recording(projection: Projection, mine: set[uuid.UUID], seen: list[Message]) -> Projection:
    """The projection under its own checkpoint name, recording what reaches its `apply` (only this
    test's messages are applied: the shared log may hold other tests' events)."""

    async def apply(conn: AsyncConnection, message: Message, tables: Mapping[str, Table]) -> None:
        if message.id in mine:
            seen.append(message)
            await projection.apply(conn, message, tables)

    name = f"{projection.name}_upcast_{uuid.uuid4().hex[:8]}"
    return dataclasses.replace(projection, name=name, apply=apply, apply_batch=None)


@pytest.fixture
async def container(database_url: str) -> AsyncIterator[Container]:
    built = build_container(make_settings(database_url), clock=ManualClock())
    try:
        yield built
    finally:
        async with built.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(delete(table))
        await built.close()


async def sales_days(container: Container) -> dict[date, int]:
    s = sales_by_day.c
    async with container.db.read() as conn:
        rows = await conn.execute(select(s.day, s.orders).where(s.currency == "XTS"))
        return {day: int(orders) for day, orders in rows}


async def test_every_consumer_on_the_sql_log_reads_v1_and_v2_as_current(container: Container) -> None:
    v1, v2 = completed_events()
    captured = captured_v1()
    await container.stream.publish([v1, v2, captured])
    mine = {v1.id, v2.id}

    for projection in PROJECTIONS:
        seen: list[Message] = []
        projector = Projector(container.db, recording(projection, mine, seen), clock=container.clock)
        while await projector.run_once():
            pass
        assert_current(seen)
    # sales_by_day files each completion on the day the order completed: v2 by its `completed_at`
    # (the day before the event's time), v1 by the event's own time.
    assert await sales_days(container) == {V1_DAY: 1, V2_DAY: 1}

    handled: list[Message] = []
    notifications = NotificationsService(container.db, container.clock)
    real_handle = notifications.handle

    async def notify(conn: AsyncConnection, message: Message) -> None:
        if message.id in mine:
            handled.append(message)
        await real_handle(conn, message)

    real_handle_batch = notifications.handle_batch

    async def notify_batch(conn: AsyncConnection, messages: Sequence[Message]) -> None:
        handled.extend(m for m in messages if m.id in mine)
        await real_handle_batch(conn, messages)

    notifications.handle = notify  # type: ignore[method-assign]
    # The consumer applies a pass's new messages through the batch handler (ADR 0073).
    notifications.handle_batch = notify_batch  # type: ignore[method-assign]
    consumer = notifications.consumer(container.stream, name="upcast-test")
    while await consumer.run_once():
        pass
    assert_current(handled)

    ledger_seen: list[Message] = []
    real_ledger = container.payments.handle

    async def ledger(conn: AsyncConnection, message: Message) -> None:
        ledger_seen.append(message)
        await real_ledger(conn, message)

    real_ledger_batch = container.payments.handle_batch

    async def ledger_batch(conn: AsyncConnection, messages: Sequence[Message]) -> None:
        ledger_seen.extend(messages)
        await real_ledger_batch(conn, messages)

    container.payments.handle = ledger  # type: ignore[method-assign]
    # The consumer tries a pass's batch first (ADR 0073), then one message at a time if it fails.
    container.payments.handle_batch = ledger_batch  # type: ignore[method-assign]
    payments = container.payments.consumer(container.stream, name="upcast-test")
    while await payments.run_once():
        pass
    # Payment events have one version: an unstamped stored event arrives stamped as the current one.
    assert {m.dataschema for m in ledger_seen if m.id == captured.id} == {f"/schemas/{CAPTURED}/v1"}


@pytest.fixture
async def redis_stream() -> AsyncIterator[Stream]:
    client = Redis.from_url(REDIS_URL)
    stream = RedisStream(client, prefix=f"test:{uuid.uuid4().hex}", poll_interval_s=0.01, partitions=2)
    try:
        yield stream
    finally:
        await stream.delete_all()
        await client.aclose()


async def test_the_stream_projector_reads_v1_and_v2_as_current(
    container: Container, redis_stream: Stream
) -> None:
    v1, v2 = completed_events()
    await redis_stream.publish([v1, v2])
    for projection in PROJECTIONS:
        seen: list[Message] = []
        projector = StreamProjector(
            container.db, recording(projection, {v1.id, v2.id}, seen), redis_stream, clock=container.clock
        )
        while await projector.run_once():
            pass
        assert_current(seen)
    assert await sales_days(container) == {V1_DAY: 1, V2_DAY: 1}


def test_an_unknown_type_passes_and_a_newer_version_is_refused() -> None:
    from mercato.kit.schemas import UpcastError
    from mercato.schemas import read_message

    v1, _ = completed_events()
    other = dataclasses.replace(v1, type="mercato.orders.order_returned")
    assert read_message(other) is other
    future = dataclasses.replace(v1, dataschema=f"/schemas/{COMPLETED}/v3")
    with pytest.raises(UpcastError, match="newer"):
        read_message(future)
