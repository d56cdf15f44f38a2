"""`RedisStream` against the real Redis on this machine: the shared contract, then what only a
broker can show, a `redis-server` killed with SIGKILL mid-stream and restarted on its own files.

Every test works under a fresh key prefix and deletes it afterwards: the server is shared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mercato.kit.clock import ManualClock
from mercato.kit.messaging import RedisStream, Stream
from mercato.kit.messaging.redis_client import redis_client as deadline_client

from .broker_restart import (
    PrivateServer,
    assert_every_confirmed_message_delivered_in_key_order,
    publish_until_killed,
)
from .test_stream_contract import TOPIC, StreamContract, make_message

REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    # The client bootstrap gives the stream (ADR 0082: no task per command).
    client = deadline_client(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


class TestRedisStream(StreamContract):
    # Visibility timeouts of the contract (5-10 s) become 0.5-1 s of Redis idle time.
    broker_time_scale = 0.1

    @pytest.fixture
    async def make_stream(
        self, redis_client: Redis, clock: ManualClock
    ) -> AsyncIterator[Callable[..., Stream]]:
        built: list[RedisStream] = []

        def build(
            *, partitions: int = 4, visibility_timeout_s: float = 30.0, max_attempts: int = 3
        ) -> Stream:
            stream = RedisStream(
                redis_client,
                prefix=f"test:{uuid.uuid4().hex}",
                partitions=partitions,
                visibility_timeout_s=visibility_timeout_s * (self.broker_time_scale or 1.0),
                max_attempts=max_attempts,
                poll_interval_s=0.01,
                clock=clock,
            )
            built.append(stream)
            return stream

        yield build
        for stream in built:
            await stream.delete_all()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateServer]:
    """A redis-server of our own on a free port and a temporary directory.

    `appendonly yes` + `appendfsync always`: every write is appended to the AOF and fsynced before
    Redis replies, so an acknowledged XADD survives SIGKILL (and a power cut). RDB snapshots are off
    so the AOF is the only source on restart.
    """
    options = ["--bind", "127.0.0.1", "--dir", str(tmp_path), "--appendonly", "yes"]
    options += ["--appendfsync", "always", "--save", "", "--protected-mode", "no"]
    with PrivateServer(lambda port: [REDIS_SERVER, "--port", str(port), *options]) as server:
        yield server


async def _connect(port: int) -> Redis:
    for _ in range(200):
        client = Redis(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            await client.ping()
            return client
        except Exception:  # the server is still starting
            await client.aclose()
            await asyncio.sleep(0.02)
    raise RuntimeError("private redis-server did not start")


async def test_no_confirmed_message_is_lost_when_redis_is_killed_mid_stream(
    private_redis: PrivateServer, clock: ManualClock
) -> None:
    server = private_redis.start()
    client = await _connect(private_redis.port)
    stream = RedisStream(client, prefix="restart", partitions=4, clock=clock)
    confirmed = await publish_until_killed(stream, server)
    await client.aclose()

    private_redis.start()
    client = await _connect(private_redis.port)
    stream = RedisStream(client, prefix="restart", partitions=4, clock=clock)
    await assert_every_confirmed_message_delivered_in_key_order(stream, confirmed)
    await client.aclose()


async def test_ack_many_is_one_script_call_and_still_refuses_a_stale_delivery(
    redis_client: Redis, clock: ManualClock
) -> None:
    """A pass's acks are one round trip (ADR 0065: one script call per message held the chat
    persister's next pass back 40-110 ms per 50 messages), each still checked as `ack` checks it."""
    stream = RedisStream(redis_client, prefix=f"test:{uuid.uuid4().hex}", partitions=3, clock=clock)
    try:
        await stream.publish([make_message(f"k{n % 6}", n) for n in range(12)])
        batch = await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0)
        assert len(batch) == 12
        calls: list[str] = []
        single, many = stream._ack, stream._ack_many

        async def one(**kwargs: object) -> object:
            calls.append("ack")
            return await single(**kwargs)

        async def all_of(**kwargs: object) -> object:
            calls.append("ack_many")
            return await many(**kwargs)

        stream._ack, stream._ack_many = one, all_of  # type: ignore[method-assign, assignment]
        # A stale handle (another attempt than the pending entry's) is not acknowledged by it.
        stale = dataclasses.replace(batch[0], attempt=batch[0].attempt + 1)
        await stream.ack_many([stale, *batch[1:]])
        assert calls == ["ack_many"]
        assert await stream.lag(TOPIC, "g") == 1
        await stream.ack_many([batch[0]])
        assert await stream.lag(TOPIC, "g") == 0
    finally:
        await stream.delete_all()
