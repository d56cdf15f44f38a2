"""The `Broker` port's contract, run over every adapter on its real server: the SQL broker on SQLite
and PostgreSQL, Redis Streams on :6379, core NATS on :4222. Two broker instances stand for two
processes; each must hear every event published by either, in publish order, from subscription on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from mercato.kit.realtime import Broker, ChannelEvent, NatsBroker, RedisBroker, SqlBroker, Subscription
from mercato.kit.storage import create_database

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"

BrokerFactory = Callable[[], Broker]


@pytest.fixture(params=["sql-sqlite", "sql-postgresql", "redis", "nats"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The adapter under test and, for the SQL broker, its migrated database (resolved outside a loop)."""
    if request.param == "sql-sqlite":
        return request.param, str(request.getfixturevalue("sqlite_url"))
    if request.param == "sql-postgresql":
        return request.param, str(request.getfixturevalue("pg_url"))
    return request.param, ""


@pytest.fixture
async def make_broker(backend: tuple[str, str]) -> AsyncIterator[BrokerFactory]:
    made: list[Broker] = []
    disposers: list[Callable[[], Awaitable[None]]] = []
    name = f"h5rt-{uuid.uuid4().hex[:10]}"
    kind, url = backend
    if kind.startswith("sql"):
        db = create_database(url)
        disposers.append(db.dispose)

        def factory() -> Broker:
            made.append(SqlBroker(db, poll_interval_s=0.01))
            return made[-1]
    elif kind == "redis":

        def factory() -> Broker:
            made.append(RedisBroker(Redis.from_url(REDIS_URL), key=name))
            return made[-1]

        async def drop_key() -> None:
            client = Redis.from_url(REDIS_URL)
            await client.delete(name)
            await client.aclose()

        disposers.append(drop_key)
    else:

        def factory() -> Broker:
            made.append(NatsBroker(servers=NATS_URL, subject=name.replace("-", "_")))
            return made[-1]

    yield factory
    for broker in made:
        await broker.aclose()
    for dispose in disposers:
        await dispose()


def event(channel: str, n: int, **extra: object) -> ChannelEvent:
    return ChannelEvent(channel=channel, type="message", data={"n": n, **extra}, seq=n)


async def take(subscription: Subscription, count: int, *, timeout_s: float = 5.0) -> list[ChannelEvent]:
    got: list[ChannelEvent] = []

    async def collect() -> None:
        while len(got) < count:
            item = await subscription.get()
            assert item is not None
            got.append(item)

    await asyncio.wait_for(collect(), timeout_s)
    return got


async def test_every_process_hears_every_event_in_publish_order(make_broker: BrokerFactory) -> None:
    one, two = make_broker(), make_broker()
    sub_one, sub_two = await one.subscribe(), await two.subscribe()
    for n in range(1, 51):
        await (one if n % 2 else two).publish(event("room:a", n))
    for sub in (sub_one, sub_two):
        got = await take(sub, 50)
        # Two publishers: each one's own events stay in its publish order.
        odd = [e.data["n"] for e in got if e.data["n"] % 2]
        even = [e.data["n"] for e in got if not e.data["n"] % 2]
        assert odd == list(range(1, 51, 2))
        assert even == list(range(2, 51, 2))


async def test_publish_many_is_heard_by_every_process_in_order(make_broker: BrokerFactory) -> None:
    """A persister pass's events (ADR 0056): one call, every subscriber, publish order."""
    one, two = make_broker(), make_broker()
    sub_one, sub_two = await one.subscribe(), await two.subscribe()
    await one.publish_many([event("room:a", n) for n in range(1, 31)])
    await one.publish_many([])
    await two.publish(event("room:a", 31))
    for sub in (sub_one, sub_two):
        got = await take(sub, 31)
        assert [e.data["n"] for e in got if e.data["n"] <= 30] == list(range(1, 31))


async def test_events_round_trip_intact(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    sub = await broker.subscribe()
    sent = ChannelEvent(
        channel="order:x",
        type="order.status",
        data={"status": "completed", "text": "é" * 20_000},
        seq=7,
        essential=True,
        origin="node-1",
        reply_to="node-1/3",
        ack={"client_msg_id": "c-1"},
        at=1234.5,
    )
    await broker.publish(sent)
    [got] = await take(sub, 1)
    assert got == sent


async def test_a_subscription_starts_at_now(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    await broker.publish(event("room:a", 1))
    sub = await broker.subscribe()
    await broker.publish(event("room:a", 2))
    [got] = await take(sub, 1)
    assert got.seq == 2


async def test_unsubscribe_ends_the_subscription(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    sub = await broker.subscribe()
    await broker.unsubscribe(sub)
    await broker.publish(event("room:a", 1))
    assert await asyncio.wait_for(sub.get(), 2) is None


@pytest.fixture(params=["sqlite_url", "pg_url"])
def sql_url(request: pytest.FixtureRequest) -> str:
    """A migrated database on each engine (resolved outside a loop)."""
    return str(request.getfixturevalue(request.param))


async def test_the_sql_broker_keeps_delivering_after_retention_empties_its_log(sql_url: str) -> None:
    """On SQLite the log's id is the rowid, which restarts at 1 in an empty table: pruning every row
    once left each subscriber waiting for ids above the old ones forever (an idle shop's chat and
    order streams went silent after the retention). The newest row is never pruned."""
    db = create_database(sql_url)
    broker = SqlBroker(db, poll_interval_s=0.01, retention_s=0.2)
    try:
        subscription = await broker.subscribe()
        await broker.publish(event("room:r", 1))
        assert [e.data["n"] for e in await take(subscription, 1)] == [1]
        await asyncio.sleep(0.5)  # past the retention, and past the subscriber's prune interval
        await broker.publish(event("room:r", 2))  # the next poll prunes everything older than 0.2 s
        assert [e.data["n"] for e in await take(subscription, 1)] == [2]
        await asyncio.sleep(0.5)
        await broker.publish(event("room:r", 3))
        assert [e.data["n"] for e in await take(subscription, 1)] == [3]
    finally:
        await broker.aclose()
        await db.dispose()
