"""`StreamProjector`: read models fed by a broker keep the projector's guarantees.

The counting projection of `test_projections`, now fed through the `Stream` port by the real Redis
Streams and the real NATS JetStream on this machine, with the checkpoint on SQLite and PostgreSQL.
What must hold: each message applied once although the broker delivers at least once (lost acks,
killed passes, two workers); a poison message costs only itself and is applied once when its dead
letter is replayed; a rebuild equals the live read model."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime

import nats
import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import JetStreamStream, Message, RedisStream, Stream
from mercato.kit.projections import Projection, PrometheusProjectionHook, StreamProjector
from mercato.kit.storage import Database

from .test_projections import EXPECTED, TOPIC, Counting, counts, db, rows

__all__ = ["db"]  # the fixture, re-exported for pytest

REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("MERCATO_TEST_NATS_URL", "nats://127.0.0.1:4222")
VISIBILITY_S = 0.5


# Brokers only: with the SQL log the app uses `Projector`, which reads the log table directly (a
# `StreamProjector` over the SQL log on SQLite would wait on its own write lock during a rebuild).
@pytest.fixture(params=["redis", "nats"])
async def stream(request: pytest.FixtureRequest) -> AsyncIterator[Stream]:
    """A fresh stream per test on the given backend (brokers under a unique prefix, deleted after)."""
    clock = ManualClock()
    common = {"partitions": 3, "visibility_timeout_s": VISIBILITY_S, "max_attempts": 2, "clock": clock}
    if request.param == "redis":
        client = Redis.from_url(REDIS_URL)
        redis_stream = RedisStream(client, prefix=f"test:{uuid.uuid4().hex}", poll_interval_s=0.01, **common)
        try:
            yield redis_stream
        finally:
            await redis_stream.delete_all()
            await client.aclose()
    elif request.param == "nats":
        nc: NatsClient = await nats.connect(NATS_URL)
        nats_stream = JetStreamStream(
            client=nc, prefix=f"t{uuid.uuid4().hex[:16]}", poll_interval_s=0.01, **common
        )
        try:
            yield nats_stream
        finally:
            await nats_stream.delete_all([TOPIC])
            await nc.drain()


async def redelivery_due(stream: Stream) -> None:
    """Let the visibility timeout pass (the brokers count real time)."""
    await asyncio.sleep(VISIBILITY_S * 1.5)


async def publish(stream: Stream, n: int, *, keys: int = 5, subject: str | None = None) -> None:
    await stream.publish(
        [
            Message(
                id=new_id(),
                source="test",
                type="test.counts.added",
                subject=subject or f"k{i % keys}",
                time=datetime(2026, 12, 1, 12, tzinfo=UTC),
                data={"amount": i},
                topic=TOPIC,
            )
            for i in range(n)
        ]
    )


def projector(db: Database, stream: Stream, counting: Counting, **kw: object) -> StreamProjector:
    projection = Projection(name="test_counts", topics=(TOPIC,), tables=(counts,), apply=counting.apply)
    return StreamProjector(db, projection, stream, batch_size=1000, **kw)  # type: ignore[arg-type]


async def drain(live: StreamProjector, *, passes: int = 20) -> int:
    applied = 0
    for _ in range(passes):
        applied += await live.run_once()
        if await live.lag() == 0:
            break
    return applied


async def test_applies_each_message_once_and_a_lost_ack_is_skipped_on_redelivery(
    db: Database, stream: Stream
) -> None:
    await publish(stream, 20)
    live = projector(db, stream, Counting())

    async def lose_acks(deliveries: object) -> None:
        return None  # committed, then the process died before acknowledging

    live._ack = lose_acks  # type: ignore[method-assign]
    assert await live.run_once() == 20
    assert await rows(db) == EXPECTED
    del live._ack
    await redelivery_due(stream)
    assert await drain(live) == 0, "every redelivery is below the checkpoint"
    assert await rows(db) == EXPECTED
    assert await live.lag() == 0


async def test_a_killed_pass_rolls_back_and_is_applied_once_after_redelivery(
    db: Database, stream: Stream
) -> None:
    await publish(stream, 20)
    counting = Counting()
    live = projector(db, stream, counting)
    counting.block_at = 9
    task = asyncio.create_task(live.run_once())
    await asyncio.wait_for(counting.blocked.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    counting.block_at = None
    assert await rows(db) == []
    await redelivery_due(stream)
    assert await drain(live) == 20
    assert await rows(db) == EXPECTED


async def test_two_workers_of_one_projection_apply_each_message_once(db: Database, stream: Stream) -> None:
    await publish(stream, 60, keys=6)
    counting = Counting()
    first = projector(db, stream, counting, consumer="w1")
    second = projector(db, stream, counting, consumer="w2")
    first.batch_size = second.batch_size = 7
    for _ in range(30):
        await asyncio.gather(first.run_once(), second.run_once())
        if await first.lag() == 0:
            break
    assert [a for _, a, _ in await rows(db)] == [10] * 6
    assert sum(t for _, _, t in await rows(db)) == sum(range(60))


class Poisoned(Counting):
    def __init__(self, subject: str) -> None:
        super().__init__()
        self.subject = subject
        self.fixed = False

    async def apply(self, conn: AsyncConnection, message: Message, tables: Mapping[str, Table]) -> None:
        if message.subject == self.subject and not self.fixed:
            raise ValueError("cannot project this message")
        await super().apply(conn, message, tables)


async def test_a_poison_message_costs_only_itself_and_its_replayed_dead_letter_applies_once(
    db: Database, stream: Stream
) -> None:
    await publish(stream, 20)
    await publish(stream, 1, subject="poison")
    counting = Poisoned("poison")
    live = projector(db, stream, counting)
    for _ in range(6):  # max_attempts=2: nacked twice, then dead-lettered
        await live.run_once()
        await redelivery_due(stream)
    assert await rows(db) == EXPECTED, "everything but the poison message is applied, once"
    letters = await stream.dead_letters(topic=TOPIC, group=live.group)
    assert [letter.message.subject for letter in letters] == ["poison"]

    counting.fixed = True  # the projection's bug is fixed; the operator replays the dead letter
    assert await stream.replay_dead_letters(topic=TOPIC) == 1

    async def lose_acks(deliveries: object) -> None:
        return None

    live._ack = lose_acks  # type: ignore[method-assign]
    await drain(live, passes=1)
    assert ("poison", 1, 0) in await rows(db)
    del live._ack
    await redelivery_due(stream)  # the replayed letter's ack was lost: it comes back
    await drain(live)
    assert ("poison", 1, 0) in await rows(db), "the inbox keeps a replayed dead letter to one apply"
    assert await rows(db) == sorted([*EXPECTED, ("poison", 1, 0)])


async def test_rebuild_equals_the_live_read_model_and_nothing_is_applied_twice_after(
    db: Database, stream: Stream
) -> None:
    registry = CollectorRegistry()
    await publish(stream, 20)
    live = projector(db, stream, Counting(), hook=PrometheusProjectionHook.for_registry(registry))
    assert await live.lag() == 20
    assert registry.get_sample_value("mercato_projection_lag_messages", {"projection": "test_counts"}) == 20
    await drain(live)
    before = await rows(db)
    report = await live.rebuild()
    assert report.messages == 20
    assert await rows(db) == before == EXPECTED
    await publish(stream, 5)
    assert await drain(live) == 5
    assert [a for _, a, _ in await rows(db)] == [5, 5, 5, 5, 5]
    again = await live.rebuild()  # the rebuild group is rewound, not left at its end
    assert again.messages == 25
    assert [a for _, a, _ in await rows(db)] == [5, 5, 5, 5, 5]


@pytest.mark.parametrize("backend", ["sql", "redis", "nats"])
async def test_the_configured_backend_chooses_the_projector(backend: str, sqlite_url: str) -> None:
    from mercato.bootstrap import build_container
    from mercato.config import MessagingSettings
    from mercato.kit.projections import Projector
    from mercato.workers.projections import build_projectors
    from tests.conftest import make_settings

    messaging = MessagingSettings(backend=backend, broker_prefix=f"t{uuid.uuid4().hex[:12]}")  # type: ignore[arg-type]
    container = build_container(make_settings(sqlite_url, messaging=messaging))
    try:
        projectors = build_projectors(container)
        assert projectors, "the reporting projections are built"
        for built in projectors.values():
            assert isinstance(built, StreamProjector) == (backend != "sql")
            assert isinstance(built, Projector)
    finally:
        await container.close()
