"""Inbox dedup and the consumer runner on real SQLite and PostgreSQL: duplicates apply once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import (
    Consumer,
    Delivery,
    Handler,
    Inbox,
    Message,
    PrometheusMessagingHook,
    SqlLogStream,
)
from mercato.kit.storage import get_meta, set_meta
from tests.integration.test_stream_contract import TOPIC, make_message


@pytest.fixture
def stream(container: Container, clock: ManualClock) -> SqlLogStream:
    return SqlLogStream(container.db, partitions=2, visibility_timeout_s=10, max_attempts=3, clock=clock)


async def effect_count(container: Container, key: str = "effect") -> int:
    async with container.db.read() as conn:
        return int(await get_meta(conn, key) or 0)


def counting_handler(clock: ManualClock, seen: list[Message] | None = None) -> Handler:
    async def handle(conn: AsyncConnection, message: Message) -> None:
        applied = int(await get_meta(conn, "effect") or 0)
        await set_meta(conn, "effect", str(applied + 1), now=clock.now())
        if seen is not None:
            seen.append(message)

    return handle


def metric(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name, {"group": "billing", "topic": TOPIC}) or 0.0


async def test_seen_or_record_is_per_consumer_and_only_kept_when_committed(
    container: Container, clock: ManualClock
) -> None:
    inbox = Inbox(clock=clock)
    message_id = new_id()

    async def record_then_fail() -> None:
        async with container.db.write() as conn:
            assert not await inbox.seen_or_record(conn, consumer="billing", message_id=message_id)
            raise RuntimeError("the effect failed: the record goes with it")

    with pytest.raises(RuntimeError):
        await record_then_fail()
    async with container.db.write() as conn:
        assert not await inbox.seen_or_record(conn, consumer="billing", message_id=message_id)
    async with container.db.write() as conn:
        assert await inbox.seen_or_record(conn, consumer="billing", message_id=message_id)
        assert not await inbox.seen_or_record(conn, consumer="shipping", message_id=message_id)
    clock.advance(86_400)
    async with container.db.write() as conn:
        assert await inbox.purge(conn, before=clock.now()) == 2


async def test_concurrent_duplicates_apply_once(container: Container, clock: ManualClock) -> None:
    inbox = Inbox(clock=clock)
    message_id = new_id()
    handle = counting_handler(clock)
    message = make_message("order-1")

    async def apply() -> bool:
        async with container.db.write() as conn:
            if await inbox.seen_or_record(conn, consumer="billing", message_id=message_id):
                return False
            await asyncio.sleep(0.05)  # hold the transaction open while the duplicate arrives
            await handle(conn, message)
            return True

    results = await asyncio.gather(*(apply() for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    assert await effect_count(container) == 1


async def test_duplicate_deliveries_are_applied_once(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    class AckLost:
        """The real stream, except that the first ack never arrives (the consumer died)."""

        def __init__(self) -> None:
            self.lost = 1

        def __getattr__(self, name: str) -> object:
            if name == "ack_in_order_runs":
                # Acks apart from the consumer's transaction, as a broker's are: on the SQL log of
                # the consumer's database they commit with its effects and cannot be lost alone.
                raise AttributeError(name)
            return getattr(stream, name)

        async def ack(self, delivery: Delivery) -> None:
            if self.lost:
                self.lost -= 1
                raise ConnectionError("consumer died after commit, before ack")
            await stream.ack(delivery)

        async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
            for delivery in deliveries:
                await self.ack(delivery)

    registry = CollectorRegistry()
    hook = PrometheusMessagingHook(registry)
    message = make_message("order-1")
    await stream.publish([message])
    flaky = Consumer(
        container.db,
        AckLost(),  # type: ignore[arg-type]
        topic=TOPIC,
        group="billing",
        name="c1",
        handler=counting_handler(clock),
        hook=hook,
    )
    with pytest.raises(ConnectionError):
        await flaky.run_once()
    assert await effect_count(container) == 1
    clock.advance(11)
    # Redelivered after the visibility timeout; the inbox knows it.
    assert await flaky.run_once() == 1
    # And the publisher sending it again (a relay retry) changes nothing either.
    await stream.publish([message])
    assert await flaky.run_once() == 0
    assert await effect_count(container) == 1
    assert metric(registry, "mercato_messaging_consumer_dedup_hits_total") == 1
    assert metric(registry, "mercato_messaging_consumer_redelivered_total") == 1
    assert metric(registry, "mercato_messaging_consumer_processed_total") == 0
    assert metric(registry, "mercato_messaging_consumer_lag_messages") == 0


async def test_failing_handler_retries_in_order_then_dead_letters(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    hook = PrometheusMessagingHook(registry)
    dlq_stream = SqlLogStream(
        container.db, partitions=1, visibility_timeout_s=10, max_attempts=3, clock=clock, hook=hook
    )
    messages = [make_message("order-1", n) for n in range(3)]
    await dlq_stream.publish(messages)
    applied: list[int] = []

    async def handle(conn: AsyncConnection, message: Message) -> None:
        if message.data["n"] == 1:
            raise ValueError("cannot parse order-1 #1")
        await counting_handler(clock)(conn, message)
        applied.append(message.data["n"])

    consumer = Consumer(
        container.db, dlq_stream, topic=TOPIC, group="billing", name="c1", handler=handle, hook=hook
    )
    # Pass 1: the batch fails as a whole and rolls back (the handler saw #0 first: `applied`
    # counts calls, the effect counts commits), then goes one delivery at a time: #0 applied, #1
    # fails, #2 waits behind it. Passes 2 and 3: #1 fails again, and at its third failure goes to
    # the dead-letter queue. Pass 4: #2, never before #1 was settled.
    assert await consumer.run_once() == 1
    assert applied == [0, 0]
    assert await effect_count(container) == 1
    assert await consumer.run_once() == 0
    assert await consumer.run_once() == 0
    assert await effect_count(container) == 1
    assert await consumer.run_once() == 1
    assert applied == [0, 0, 2]
    [letter] = await dlq_stream.dead_letters()
    assert letter.message.id == messages[1].id
    assert letter.attempts == 3
    assert letter.last_error == "ValueError: cannot parse order-1 #1"
    assert metric(registry, "mercato_messaging_consumer_dead_lettered_total") == 1
    assert metric(registry, "mercato_messaging_consumer_processed_total") == 2
    assert await effect_count(container) == 2


async def test_consumer_handles_everything_once_across_partitions(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    seen: list[Message] = []
    messages: Sequence[Message] = [make_message(f"order-{n % 4}", n) for n in range(12)]
    await stream.publish(messages)
    consumers = [
        Consumer(
            container.db,
            stream,
            topic=TOPIC,
            group="billing",
            name=f"c{n}",
            handler=counting_handler(clock, seen),
            max_messages=4,
        )
        for n in range(2)
    ]
    while sum(await asyncio.gather(*(c.run_once() for c in consumers))):
        pass
    assert sorted(m.id for m in seen) == sorted(m.id for m in messages)
    assert await effect_count(container) == 12


async def test_a_failing_batch_handler_is_redone_one_message_at_a_time(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    """The batch handler applies the batch's new messages in one call; when it fails, the pass rolls
    back and goes on through the per-message handler, which dead-letters only the culprit."""
    batches: list[list[str]] = []

    async def handle_batch(conn: AsyncConnection, messages: Sequence[Message]) -> None:
        batches.append([m.key for m in messages])
        for message in messages:
            await handle(conn, message)

    async def handle(conn: AsyncConnection, message: Message) -> None:
        if message.key == "poison":
            raise ValueError("cannot apply")
        await counting_handler(clock)(conn, message)

    healthy = [make_message(f"order-{n}") for n in range(4)]
    await stream.publish(healthy)
    reader = Consumer(
        container.db,
        stream,
        topic=TOPIC,
        group="billing",
        name="c1",
        handler=handle,
        batch_handler=handle_batch,
    )
    assert await reader.run_once() == 4
    assert batches == [[m.key for m in healthy]]  # one call for the whole batch
    assert await effect_count(container) == 4
    # A poison message: the batch handler fails, and the one-at-a-time pass nacks it alone (a
    # message after it in its partition waits for it, as with the per-message handler).
    await stream.publish([make_message("poison"), make_message("order-9")])
    for _ in range(4):
        await reader.run_once()
        clock.advance(60)
    assert await effect_count(container) == 5  # order-9 applied once, the poison never
    dead = await stream.dead_letters(group="billing")
    assert [d.message.key for d in dead] == ["poison"]
