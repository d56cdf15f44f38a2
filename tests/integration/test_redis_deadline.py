"""The stream's and the broker's Redis client (`kit/messaging/redis_client.py`, ADR 0082): no task per
command, and still a deadline: a Redis that stops answering or stops reading ends the command with
redis-py's `TimeoutError` (which the API maps to a 503 with Retry-After), never a hang."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from mercato.bootstrap.backends import build_broker, build_stream
from mercato.config import Settings
from mercato.kit.clock import SystemClock
from mercato.kit.messaging import RedisStream
from mercato.kit.messaging.redis_client import DeadlineConnection, redis_client
from mercato.kit.realtime import RedisBroker

REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _tasks_made(loop: asyncio.AbstractEventLoop) -> list[int]:
    made = [0]
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        made[0] += 1
        if factory is not None:
            return factory(loop, coro, **kwargs)  # type: ignore[arg-type]
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)  # type: ignore[arg-type]
    return made


async def test_a_command_makes_no_task_where_redis_py_s_default_makes_one_per_write() -> None:
    deadline, default = redis_client(REDIS_URL), Redis.from_url(REDIS_URL)
    try:
        await deadline.ping()
        await default.ping()
        loop = asyncio.get_running_loop()
        made = _tasks_made(loop)
        for _ in range(50):
            await deadline.ping()
        pipe = deadline.pipeline(transaction=False)
        pipe.ping().ping()
        await pipe.execute()
        ours = made[0]
        for _ in range(50):
            await default.ping()
        loop.set_task_factory(None)
        assert ours == 0
        assert made[0] - ours == 50, "redis-py's own connection: a wait_for task per write (the baseline)"
    finally:
        await deadline.aclose()
        await default.aclose()


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """Accepts, answers the handshake's nothing, reads nothing after its first bytes: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await asyncio.sleep(3600)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), held
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_redis_that_never_answers_times_out_within_the_deadline(
    silent_server: tuple[int, list[asyncio.StreamWriter]],
) -> None:
    port, _held = silent_server
    client = redis_client(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.3, retry=None)
    try:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.xadd("k", {"e": b"x"})
        assert time.monotonic() - started < 2.0
    finally:
        await client.aclose()


async def _write_until_it_waits(connection: DeadlineConnection) -> None:
    for _ in range(64):  # 64 x 1 MiB: far more than any loopback socket buffers
        await connection.send_packed_command([b"x" * (1 << 20)])


async def test_a_redis_that_stops_reading_times_the_write_out() -> None:
    """A write larger than the socket and transport buffers waits in `drain`: that wait has the deadline
    (the path that arms `asyncio.timeout`), and the connection is dropped after it."""
    reading = asyncio.Event()
    reading.set()
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while reading.is_set():  # the handshake answered (+OK per command), then nothing is read
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.05)
            except TimeoutError:
                continue
            if not chunk:
                return
            writer.write(b"+OK\r\n" * len(re.findall(rb"(?:^|\r\n)\*\d+\r\n\$", chunk)))
        await asyncio.sleep(3600)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    connection = DeadlineConnection(host="127.0.0.1", port=port, socket_timeout=0.3, retry=None, protocol=2)
    try:
        await connection.connect()
        reading.clear()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await _write_until_it_waits(connection)
        assert time.monotonic() - started < 2.0
        assert not connection.is_connected
    finally:
        await connection.disconnect()
        for writer in held:
            writer.close()
        server.close()


def test_the_stream_and_the_broker_are_built_on_it() -> None:
    settings = Settings.model_validate({"messaging": {"backend": "redis", "redis_url": REDIS_URL}})
    stream = build_stream(settings, db=None, clock=SystemClock())  # type: ignore[arg-type]
    broker = build_broker(settings, db=None)  # type: ignore[arg-type]
    assert isinstance(stream, RedisStream)
    assert isinstance(broker, RedisBroker)
    for client in (stream.client, broker._redis):
        assert client.connection_pool.connection_class is DeadlineConnection
