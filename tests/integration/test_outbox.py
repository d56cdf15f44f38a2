"""Transactional outbox and relay on real SQLite and PostgreSQL: no phantom, no loss, order per key."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.messaging import Consumer, Inbox, Message, Outbox, OutboxRelay, SqlLogStream, Stream
from mercato.kit.messaging.tables import outbox as outbox_table
from mercato.kit.storage import get_meta, set_meta
from tests.integration.test_stream_contract import TOPIC, drain, make_message


class RecordingStream:
    """The real stream, plus a record of every message id each publish call carried."""

    def __init__(self, inner: SqlLogStream) -> None:
        self.inner = inner
        self.published: list[uuid.UUID] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        await self.inner.publish(messages)
        self.published.extend(m.id for m in messages)


class CrashAfterPublish(RecordingStream):
    """Stores the batch, then fails as a relay dying before it marks the rows would."""

    def __init__(self, inner: SqlLogStream, *, crashes: int) -> None:
        super().__init__(inner)
        self.crashes = crashes

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish(messages)
        if self.crashes:
            self.crashes -= 1
            raise ConnectionError("relay lost after publishing")


@pytest.fixture
def stream(container: Container, clock: ManualClock) -> SqlLogStream:
    return SqlLogStream(container.db, partitions=4, visibility_timeout_s=10, clock=clock)


async def test_messages_of_a_rolled_back_transaction_never_appear(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    outbox = Outbox(clock=clock)

    async def change_state_then_fail() -> None:
        async with container.db.write() as conn:
            await outbox.add(conn, make_message("order-1"))
            raise RuntimeError("the state change failed")

    with pytest.raises(RuntimeError):
        await change_state_then_fail()
    relay = OutboxRelay(container.db, stream, clock=clock)
    assert await relay.relay_once() == 0
    assert await stream.lag(TOPIC, "g") == 0
    assert (await relay.backlog()).messages == 0


async def test_committed_messages_are_published_once_and_marked(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    outbox = Outbox(clock=clock)
    messages = [make_message(f"order-{n}", n) for n in range(5)]
    async with container.db.write() as conn:
        await outbox.add_many(conn, messages[:4])
        await outbox.add(conn, messages[4])
    recording = RecordingStream(stream)
    relay = OutboxRelay(container.db, recording, batch_size=3, clock=clock)
    clock.advance(7)
    backlog = await relay.backlog()
    assert (backlog.messages, backlog.oldest_age_s) == (5, 7.0)
    assert await relay.relay_once() == 3
    assert await relay.relay_once() == 2
    assert await relay.relay_once() == 0
    assert recording.published == [m.id for m in messages]
    assert sorted(d.message.id for d in await drain(stream, "g")) == sorted(m.id for m in messages)
    assert (await relay.backlog()).messages == 0
    clock.advance(3600)
    assert await relay.purge_published(older_than_s=60) == 5


async def test_two_concurrent_relays_publish_everything_exactly_once_in_key_order(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    outbox = Outbox(clock=clock)
    keys = [f"order-{k}" for k in range(10)]
    messages = [make_message(keys[n % 10], n) for n in range(200)]
    for start in range(0, 200, 20):
        async with container.db.write() as conn:
            await outbox.add_many(conn, messages[start : start + 20])
    recording = RecordingStream(stream)
    relays = [OutboxRelay(container.db, recording, batch_size=7, clock=clock) for _ in range(2)]

    async def run(relay: OutboxRelay) -> None:
        # A pass can publish nothing while the other relay holds the older rows of its keys.
        while (await relay.backlog()).messages:
            await relay.relay_once()
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(run(r) for r in relays)), timeout=60)
    counts = Counter(recording.published)
    assert set(counts) == {m.id for m in messages}
    assert set(counts.values()) == {1}
    delivered = await drain(stream, "g")
    assert len(delivered) == 200
    for key in keys:
        assert [d.message.data["n"] for d in delivered if d.message.key == key] == [
            m.data["n"] for m in messages if m.key == key
        ]


async def test_relay_crash_between_publish_and_mark_republishes_and_the_inbox_applies_once(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    message = make_message("order-1")
    async with container.db.write() as conn:
        await Outbox(clock=clock).add(conn, message)
    crashing = CrashAfterPublish(stream, crashes=1)
    relay = OutboxRelay(container.db, crashing, clock=clock)

    async def count_effect(conn: AsyncConnection, _message: Message) -> None:
        applied = int(await get_meta(conn, "effect") or 0)
        await set_meta(conn, "effect", str(applied + 1), now=clock.now())

    # The consumer applies the first copy, then dies before acknowledging it.
    with pytest.raises(ConnectionError):
        await relay.relay_once()
    [delivery] = await stream.read(TOPIC, "billing", "c1", max_messages=10, block_s=0)
    # What a Consumer does for one delivery, stopped short of the ack: the consumer "dies".
    inbox = Inbox(clock=clock)
    async with container.db.write() as conn:
        assert not await inbox.seen_or_record(conn, consumer="billing", message_id=delivery.message.id)
        await count_effect(conn, delivery.message)
    consumer = Consumer(
        container.db, stream, topic=TOPIC, group="billing", name="c2", handler=count_effect, inbox_store=inbox
    )

    # The relay's next pass publishes the row again: it was never marked.
    assert await relay.relay_once() == 1
    assert crashing.published == [message.id, message.id]
    async with container.db.read() as conn:
        unpublished = (
            await conn.execute(
                select(func.count()).select_from(outbox_table).where(outbox_table.c.published_at.is_(None))
            )
        ).scalar_one()
    assert unpublished == 0

    clock.advance(11)
    assert await consumer.run_once() == 1
    assert await consumer.run_once() == 0
    async with container.db.read() as conn:
        assert await get_meta(conn, "effect") == "1"
    assert await stream.lag(TOPIC, "billing") == 0


async def test_a_relay_that_dies_holding_a_lease_is_taken_over_after_it(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    message = make_message("order-1")
    async with container.db.write() as conn:
        await Outbox(clock=clock).add(conn, message)

    published = asyncio.Event()

    class Hangs(RecordingStream):
        async def publish(self, messages: Sequence[Message]) -> None:
            await super().publish(messages)
            published.set()
            await asyncio.Event().wait()

    dying = OutboxRelay(container.db, Hangs(stream), clock=clock, lease_s=30)
    task = asyncio.create_task(dying.relay_once())
    await asyncio.wait_for(published.wait(), timeout=10)
    # The stuck relay still holds its lease: a healthy relay leaves the row alone until it expires.
    survivor_stream = RecordingStream(stream)
    survivor = OutboxRelay(container.db, survivor_stream, clock=clock, lease_s=30)
    assert await survivor.relay_once() == 0
    clock.advance(31)
    assert await survivor.relay_once() == 1
    assert survivor_stream.published == [message.id]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [d.message.id for d in await drain(stream, "g")] == [message.id]


async def test_a_relay_marks_in_one_statement_only_the_rows_still_under_its_lease(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    # The mark is one UPDATE for the whole batch (`id = ANY(...)` / `json_each`): a row another
    # relay took over after our lease expired keeps its new owner's lease and stays unpublished.
    messages = [make_message(f"order-{n}") for n in range(3)]
    async with container.db.write() as conn:
        await Outbox(clock=clock).add_many(conn, messages)
    slow = OutboxRelay(container.db, stream, clock=clock, lease_s=30, batch_size=2)
    slow_token = uuid.uuid4()
    slow_batch = [m.id for m in await slow._claim(slow_token)]
    assert len(slow_batch) == 2
    clock.advance(31)
    other = OutboxRelay(container.db, stream, clock=clock, lease_s=30, batch_size=1)
    other_token = uuid.uuid4()
    taken = [m.id for m in await other._claim(other_token)]
    assert taken == slow_batch[:1]

    await slow._release(slow_token, slow_batch, published=True)

    o = outbox_table.c
    async with container.db.read() as conn:
        rows = {
            row.id: (row.claim_token, row.published_at is not None)
            for row in await conn.execute(select(o.id, o.claim_token, o.published_at))
        }
    assert rows[taken[0]] == (other_token, False)  # the other relay's now: left alone
    assert rows[slow_batch[1]] == (None, True)
    third = next(m.id for m in messages if m.id not in slow_batch)
    assert rows[third] == (None, False)  # never claimed
    await other._release(other_token, taken, published=True)
    async with container.db.read() as conn:
        unpublished = await conn.scalar(select(func.count()).where(o.published_at.is_(None)))
    assert unpublished == 1


def test_relay_is_a_stream_client_of_the_protocol(stream: SqlLogStream) -> None:
    assert isinstance(stream, Stream)


class FailingAppend(SqlLogStream):
    """The SQL log, whose append fails `failures` times after the relay's claim ran in its
    transaction: a relay dying between the claim (rows marked published) and the commit."""

    def __init__(self, *args: object, failures: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failures = failures

    async def _append(self, *args: Any, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("relay lost before the commit")
        await super()._append(*args, **kwargs)


async def unpublished(container: Container) -> list[tuple[uuid.UUID, object, object]]:
    o = outbox_table.c
    async with container.db.read() as conn:
        rows = await conn.execute(
            select(o.id, o.claim_token, o.claimed_until).where(o.published_at.is_(None))
        )
        return [tuple(row) for row in rows]


async def test_on_the_sql_log_claim_append_and_mark_commit_together(
    container: Container, clock: ManualClock
) -> None:
    """ADR 0083: the relay of the SQL log on its own database claims (marking published), appends
    and commits in one transaction; a failure before the commit leaves the rows unpublished and
    unleased (retried by the next pass at once), and the log without them: never a loss, and no
    duplicate either."""
    stream = FailingAppend(container.db, partitions=4, visibility_timeout_s=10, clock=clock, failures=1)
    messages = [make_message(f"order-{n}", n) for n in range(3)]
    async with container.db.write() as conn:
        await Outbox(clock=clock).add_many(conn, messages)
    relay = OutboxRelay(container.db, stream, clock=clock)
    with pytest.raises(ConnectionError):
        await relay.relay_once()
    assert sorted(await unpublished(container)) == sorted((m.id, None, None) for m in messages)
    assert await stream.lag(TOPIC, "g") == 0
    assert await relay.relay_once() == 3
    assert await unpublished(container) == []
    assert await relay.relay_once() == 0
    delivered = await drain(stream, "g")
    assert sorted(d.message.id for d in delivered) == sorted(m.id for m in messages)  # each once


async def test_on_the_sql_log_two_relays_publish_each_row_once_in_key_order(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    """Two relays in one transaction each: a row another relay's open transaction holds is skipped
    (SKIP LOCKED), and a row whose key has an older row held there waits for a later pass."""
    keys = [f"order-{k}" for k in range(10)]
    messages = [make_message(keys[n % 10], n) for n in range(200)]
    for start in range(0, 200, 20):
        async with container.db.write() as conn:
            await Outbox(clock=clock).add_many(conn, messages[start : start + 20])
    relays = [OutboxRelay(container.db, stream, batch_size=7, clock=clock) for _ in range(2)]
    published = [0, 0]

    async def run(n: int) -> None:
        while (await relays[n].backlog()).messages:
            published[n] += await relays[n].relay_once()
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(run(0), run(1)), timeout=60)
    assert sum(published) == 200  # each row claimed, appended and marked by exactly one relay
    delivered = await drain(stream, "g")
    assert sorted(d.message.id for d in delivered) == sorted(m.id for m in messages)
    for key in keys:
        assert [d.message.data["n"] for d in delivered if d.message.key == key] == [
            m.data["n"] for m in messages if m.key == key
        ]
