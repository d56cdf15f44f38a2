"""The chat persister's broker publish and stream acks in one Redis round trip (ADR 0082, 0086):
`RedisStream.append_ack_read`, one script appending the broker's events then acknowledging (and
reading on), wired by `bootstrap.backends.publish_and_ack` when the broker and the stream share a
Redis database."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from mercato.bootstrap import Container
from mercato.bootstrap.backends import publish_and_ack
from mercato.kit.clock import ManualClock
from mercato.kit.messaging import RedisStream
from mercato.kit.messaging.redis_client import DeadlineConnection, redis_client
from mercato.kit.realtime import ChannelEvent, Hub, RedisBroker
from mercato.shop.chat.service import CHAT_GROUP, CHAT_TOPIC, ChatPersister, send_message

from .test_stream_contract import TOPIC, make_message

REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class _CountingConnection(DeadlineConnection):
    writes = 0

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def parts() -> AsyncIterator[tuple[Redis, RedisStream, RedisBroker]]:
    client = Redis.from_url(REDIS_URL, connection_class=_CountingConnection)
    prefix = f"test:{uuid.uuid4().hex}"
    stream = RedisStream(client, prefix=prefix, partitions=3, clock=ManualClock())
    broker = RedisBroker(client, key=f"{prefix}:realtime")
    try:
        yield client, stream, broker
    finally:
        await stream.delete_all()
        await client.delete(broker.key)
        await client.aclose()


def _events(n: int) -> list[ChannelEvent]:
    return [ChannelEvent(channel=f"room:{i % 3}", type="message", data={"n": i}, seq=i + 1) for i in range(n)]


async def _published(client: Redis, broker: RedisBroker) -> list[Any]:
    return [ChannelEvent.from_bytes(fields[b"e"]).data for _id, fields in await client.xrange(broker.key)]


def _payloads(n: int) -> list[bytes]:
    return [event.to_bytes() for event in _events(n)]


async def test_publish_and_acks_are_one_round_trip(parts: tuple[Redis, RedisStream, RedisBroker]) -> None:
    client, stream, broker = parts
    await stream.publish([make_message(f"k{n % 6}", n) for n in range(12)])
    batch = await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0)
    assert len(batch) == 12
    await stream.append_ack_read(broker.key, broker.max_len, [], batch[:1])  # the script is known
    _CountingConnection.writes = 0
    following = await stream.append_ack_read(broker.key, broker.max_len, _payloads(12), batch[1:])
    assert _CountingConnection.writes == 1
    assert following is None
    assert await stream.lag(TOPIC, "g") == 0
    assert await _published(client, broker) == [{"n": i} for i in range(12)]


async def test_the_next_read_rides_on_the_same_round_trip_after_the_acks(
    parts: tuple[Redis, RedisStream, RedisBroker],
) -> None:
    """The read after a pass, in the pass's script: it sees the partitions the acks released."""
    _client, stream, broker = parts
    await stream.publish([make_message("k1", n) for n in range(3)])
    first = await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0)
    await stream.publish([make_message("k1", n) for n in range(3, 5)])  # same partition: held
    assert await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0) == []
    _CountingConnection.writes = 0
    following = await stream.append_ack_read(
        broker.key, broker.max_len, _payloads(3), first, read_next=(TOPIC, "g", "c1", 100)
    )
    assert _CountingConnection.writes == 1
    assert following is not None
    assert [d.offset for d in following] == [3, 4]
    assert [d.message.data for d in following] == [
        m.data for m in [make_message("k1", 3), make_message("k1", 4)]
    ]
    after = await stream.append_ack_read(
        broker.key, broker.max_len, [], following, read_next=(TOPIC, "g", "c1", 100)
    )
    assert after == []
    assert await stream.lag(TOPIC, "g") == 0


async def test_a_stale_delivery_is_still_refused_and_an_unknown_script_is_loaded(
    parts: tuple[Redis, RedisStream, RedisBroker],
) -> None:
    client, stream, broker = parts
    await stream.publish([make_message(f"k{n % 6}", n) for n in range(6)])
    batch = await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0)
    await client.script_flush()  # a restarted server: NOSCRIPT, the script loaded and run again
    stale = dataclasses.replace(batch[0], attempt=batch[0].attempt + 1)
    following = await stream.append_ack_read(
        broker.key, broker.max_len, _payloads(2), [stale, *batch[1:]], read_next=(TOPIC, "g", "c1", 9)
    )
    assert following == []  # the stale one is still pending to c1, inside its visibility timeout
    assert await stream.lag(TOPIC, "g") == 1
    assert len(await _published(client, broker)) == 2


async def test_a_refused_publish_acknowledges_nothing(parts: tuple[Redis, RedisStream, RedisBroker]) -> None:
    """An append Redis refuses (here a wrong type at the broker's key; out of memory is the real
    case) stops the script before any ack: nothing acknowledged (it comes back)."""
    client, stream, broker = parts
    await stream.publish([make_message("k1", 1)])
    batch = await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0)
    await client.set(broker.key, "not a stream")
    with pytest.raises(ResponseError):
        await stream.append_ack_read(broker.key, broker.max_len, _payloads(1), batch)
    assert await stream.lag(TOPIC, "g") == 1
    assert await client.get(broker.key) == b"not a stream"


async def test_the_deliveries_of_one_group_only(parts: tuple[Redis, RedisStream, RedisBroker]) -> None:
    _client, stream, broker = parts
    await stream.publish([make_message("k1", 1)])
    one = await stream.read(TOPIC, "g1", "c1", max_messages=100, block_s=0)
    other = await stream.read(TOPIC, "g2", "c1", max_messages=100, block_s=0)
    with pytest.raises(ValueError, match="one group"):
        await stream.append_ack_read(broker.key, broker.max_len, [], [*one, *other])


async def test_bootstrap_joins_them_only_on_one_redis_database() -> None:
    db = int(REDIS_URL.rsplit("/", 1)[-1] or 0)
    other = REDIS_URL.rsplit("/", 1)[0] + f"/{(db + 1) % 16}"
    stream = RedisStream(redis_client(REDIS_URL), prefix=f"test:{uuid.uuid4().hex}")
    same = Hub(RedisBroker(redis_client(REDIS_URL)), history=None, node_id="t")  # type: ignore[arg-type]
    elsewhere = Hub(RedisBroker(redis_client(other)), history=None, node_id="t")  # type: ignore[arg-type]
    try:
        assert publish_and_ack(same, stream) is not None
        assert publish_and_ack(elsewhere, stream) is None
    finally:
        for client in (stream.client, same.broker._redis, elsewhere.broker._redis):  # type: ignore[attr-defined]
            await client.aclose()


class _Reads:
    """A stream that counts `read` calls (the persister's own reads, not the ones in a transaction)."""

    def __init__(self, stream: RedisStream) -> None:
        self._stream = stream
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, *args: Any, **kwargs: Any) -> Any:
        self.reads += 1
        return await self._stream.read(*args, **kwargs)


async def test_the_persister_reads_after_a_busy_pass_in_that_pass_s_round_trip(container: Container) -> None:
    """`run_once`'s loop reads again after every busy pass (ADR 0077): that read rides on the pass's
    publish and acks. An empty one stands only while no send was signalled since it was made."""
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("ahead", users, created_by=users[0])).id
    client = redis_client(REDIS_URL)
    prefix = f"test:{uuid.uuid4().hex}"
    redis_stream = RedisStream(client, prefix=prefix, partitions=4)
    stream = _Reads(redis_stream)
    hub = Hub(RedisBroker(client, key=f"{prefix}:realtime"), history=None, node_id="t")  # type: ignore[arg-type]
    together = publish_and_ack(hub, redis_stream)
    assert together is not None
    signalled = [0]

    async def publish_many(events: list[ChannelEvent]) -> None:
        raise AssertionError("a wholly persisted pass goes through publish_and_ack")

    persister = ChatPersister(
        chat,
        stream,  # type: ignore[arg-type]
        publish_many,
        consumer="t1",
        wakeups=lambda: signalled[0],
        publish_and_ack=together,
    )

    def send(n: int) -> Any:
        now = container.clock.now()
        return send_message(
            room_id=room, sender=users[0], text=f"m{n}", client_msg_id=f"c{n}", reply_to="", now=now
        )

    try:
        await redis_stream.publish([send(0)])
        assert await persister.run_once() == 1
        assert stream.reads == 1
        assert await persister.run_once() == 0  # the loop's read after the busy pass: made already
        assert stream.reads == 1
        await redis_stream.publish([send(1)])
        assert await persister.run_once() == 1
        await redis_stream.publish([send(2)])  # after that pass's read: signalled, so read again
        signalled[0] += 1
        assert await persister.run_once() == 1
        assert stream.reads == 3
        assert await persister.run_once() == 0
        assert await redis_stream.lag(CHAT_TOPIC, CHAT_GROUP) == 0
        published = await client.xrange(f"{prefix}:realtime")
        assert [ChannelEvent.from_bytes(fields[b"e"]).seq for _id, fields in published] == [1, 2, 3]
    finally:
        await redis_stream.delete_all()
        await client.delete(f"{prefix}:realtime")
        await client.aclose()
