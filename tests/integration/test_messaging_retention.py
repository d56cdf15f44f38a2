"""Retention on the real backends: the stream is trimmed by age but never below the slowest reader,
and the worker's purge and trim jobs run with the configured ages (ADR 0023).

SQL log on SQLite and PostgreSQL (consumer groups and projection checkpoints are its readers) and
Redis Streams (consumer groups, their pending entries, and the newest entry the publisher numbers
from) on the Redis at :6379 under a throwaway prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, insert, select

from mercato.bootstrap import Container
from mercato.config import MessagingSettings
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Consumer, Delivery, Inbox, Message, RedisStream, SqlLogStream, Stream
from mercato.kit.messaging.retention import trim_redis_stream, trim_sql_log
from mercato.kit.messaging.tables import inbox, outbox, stream_log
from mercato.kit.projections import Projection, Projector, RebuildIncomplete, projection_checkpoints
from mercato.shop.reporting.tables import order_summary
from mercato.workers import shop_jobs
from tests.conftest import make_settings
from tests.integration.test_stream_contract import make_message
from tests.tables import emptiable_tables

REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HOUR = 3600.0


async def read(stream: Stream, topic: str, group: str, n: int) -> list[Delivery]:
    return await stream.read(topic, group, "c1", max_messages=n, block_s=0)


async def consume(stream: Stream, topic: str, group: str, n: int) -> list[int]:
    """Read up to `n` and acknowledge them; their offsets."""
    batch = await read(stream, topic, group, n)
    for delivery in batch:
        await stream.ack(delivery)
    return [d.offset for d in batch]


async def log_offsets(container: Container, topic: str) -> list[int]:
    log = stream_log.c
    async with container.db.read() as conn:
        rows = await conn.execute(select(log.offset).where(log.topic == topic).order_by(log.offset))
        return [int(o) for o in rows.scalars()]


async def test_the_sql_log_is_trimmed_by_age_never_below_the_slowest_reader(
    container: Container, clock: ManualClock
) -> None:
    topic = f"test.retention{uuid.uuid4().hex[:8]}"
    stream = SqlLogStream(container.db, partitions=1, visibility_timeout_s=10, clock=clock)
    await stream.publish([make_message("k", n, topic=topic) for n in range(10)])
    assert await consume(stream, topic, "fast", 10) == list(range(10))
    assert await consume(stream, topic, "slow", 4) == [0, 1, 2, 3]
    clock.advance(2 * HOUR)
    fresh = make_message("k", 10, topic=topic)
    await stream.publish([fresh])  # appended now: younger than the retention
    before = clock.now() - timedelta(seconds=HOUR)

    # The slow group has acknowledged offsets 0-3 only: they go, its backlog stays however old.
    await trim_sql_log(container.db, before=before)
    assert await log_offsets(container, topic) == list(range(4, 11))
    # A projection reading the log by offset is a reader too: its checkpoint holds offset 6 back.
    async with container.db.write() as conn:
        await conn.execute(
            insert(projection_checkpoints).values(
                name="test_retention", topic=topic, partition=0, position=6, updated_at=clock.now()
            )
        )
    assert await consume(stream, topic, "slow", 100) == list(range(4, 11))
    await trim_sql_log(container.db, before=before)
    assert await log_offsets(container, topic) == list(range(6, 11))
    # Chunks of `limit`; past every reader, the age alone decides: the fresh entry stays.
    async with container.db.write() as conn:
        await conn.execute(
            projection_checkpoints.update()
            .where(projection_checkpoints.c.name == "test_retention")
            .values(position=11)
        )
    assert await trim_sql_log(container.db, before=before, limit=2) == 2
    assert await log_offsets(container, topic) == [8, 9, 10]
    assert await trim_sql_log(container.db, before=before) == 2
    assert await log_offsets(container, topic) == [10]

    # A read model can no longer be rebuilt from this log: the replay would miss offsets 0-9.
    async def nothing(*_: object) -> None:
        return None

    projection = Projection(name="test_trimmed", topics=(topic,), tables=(order_summary,), apply=nothing)
    with pytest.raises(RebuildIncomplete, match="trimmed"):
        await Projector(container.db, projection).rebuild()
    # Numbering goes on past the trimmed range, and a group that never read starts at what is kept.
    await stream.publish([make_message("k", 11, topic=topic)])
    assert await consume(stream, topic, "late", 100) == [10, 11]


@pytest.fixture
async def redis_stream(clock: ManualClock) -> AsyncIterator[RedisStream]:
    client = Redis.from_url(REDIS_URL)
    stream = RedisStream(
        client, prefix=f"test:{uuid.uuid4().hex}", partitions=1, visibility_timeout_s=30, clock=clock
    )
    try:
        yield stream
    finally:
        await stream.delete_all()
        await client.aclose()


async def test_redis_streams_are_trimmed_by_age_never_below_the_slowest_group(
    redis_stream: RedisStream, clock: ManualClock
) -> None:
    topic = "mercato.orders"
    key = f"{redis_stream.prefix}:{topic}:0"
    await redis_stream.publish([make_message("k", n, topic=topic) for n in range(10)])
    assert await consume(redis_stream, topic, "fast", 10) == list(range(10))
    assert await consume(redis_stream, topic, "slow", 4) == [0, 1, 2, 3]

    # Retention not reached: nothing goes, whatever the groups acknowledged.
    assert await trim_redis_stream(redis_stream, before=clock.now() - timedelta(seconds=HOUR)) == 0
    clock.advance(2 * HOUR)
    before = clock.now() - timedelta(seconds=HOUR)
    assert await trim_redis_stream(redis_stream, before=before) == 4
    assert await redis_stream.client.xlen(key) == 6
    # Delivered but not acknowledged (pending): may be delivered again, so it stays.
    pending = await read(redis_stream, topic, "slow", 3)
    assert [d.offset for d in pending] == [4, 5, 6]
    assert await trim_redis_stream(redis_stream, before=before, topics=[topic]) == 0
    for delivery in pending:
        await redis_stream.ack(delivery)
    assert await trim_redis_stream(redis_stream, before=before) == 3
    # Every group done: all but the newest entry go (the publisher numbers the next offset from it).
    assert await consume(redis_stream, topic, "slow", 100) == [7, 8, 9]
    assert await trim_redis_stream(redis_stream, before=before) == 2
    assert await redis_stream.client.xlen(key) == 1
    await redis_stream.publish([make_message("k", 10, topic=topic)])
    assert await consume(redis_stream, topic, "fast", 10) == [10]
    assert await redis_stream.lag(topic, "slow") == 1


def event(n: int) -> Message:
    return Message(
        id=new_id(),
        source="test",
        type="test.retention.noted",
        subject=f"k{n}",
        time=ManualClock().now(),
        data={"n": n},
        topic="test.retention",
    )


async def count(container: Container, table: object) -> int:
    async with container.db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]


async def test_the_worker_purges_and_trims_with_the_configured_retention(database_url: str) -> None:
    from mercato.bootstrap import build_container

    clock = ManualClock()
    messaging = MessagingSettings(
        outbox_retention_s=HOUR, inbox_retention_s=2 * HOUR, stream_retention_s=2 * HOUR, partitions=2
    )
    container = build_container(make_settings(database_url, messaging=messaging), clock=clock)
    try:
        async with container.db.write() as conn:
            await container.outbox.add_many(conn, [event(n) for n in range(6)])
        jobs = {job.name: job for job in shop_jobs(container)}
        assert {"purge_outbox", "purge_inbox", "trim_stream"} <= jobs.keys()
        while await jobs["outbox_relay"].run():
            pass

        async def noted(_conn: object, _message: Message) -> None:
            return None

        consumer = Consumer(
            container.db,
            container.stream,
            topic="test.retention",
            group="g",
            name="c",
            handler=noted,
            inbox_store=Inbox(clock=clock),
        )
        assert await consumer.run_once() == 6

        async def passes() -> list[int]:
            return [await jobs[name].run() for name in ("purge_outbox", "purge_inbox", "trim_stream")]

        clock.advance(HOUR / 2)  # younger than every retention: nothing goes
        assert await passes() == [0, 0, 0]
        clock.advance(HOUR)  # published 1.5 h ago: past the outbox's hour only
        assert await passes() == [6, 0, 0]
        clock.advance(HOUR)  # 2.5 h: the inbox records and the acknowledged stream entries go too
        assert await passes() == [0, 6, 6]
        assert (await count(container, outbox), await count(container, inbox)) == (0, 0)
    finally:
        async with container.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(table.delete())
        await container.close()


def test_the_inbox_must_outlive_the_stream() -> None:
    with pytest.raises(ValueError, match="inbox_retention_s"):
        MessagingSettings(stream_retention_s=10 * 86_400, inbox_retention_s=86_400)
    assert MessagingSettings().stream_retention_s is None
