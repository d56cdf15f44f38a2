"""The limiter's auto-pipelined Redis connection (ADR 0020), against the real Redis on 127.0.0.1:6379.

What must hold for it to replace redis-py on the hot path: concurrent callers share writes yet each gets
its own reply; an error reply fails one caller only; a caller that gives up never shifts the replies of
the callers behind it; a lost or silent connection fails its waiters at once and the next call
reconnects; AUTH/SELECT from the URL are honoured; decisions stay atomic (exactly the limit admitted).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mercato.kit.ratelimit import ALGORITHM_NAMES, Limit, PipelinedRedis, build_limiter

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def pipelined() -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis(REDIS_URL, socket_timeout_s=1.0)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"test:pipelined:{uuid.uuid4().hex}:"
    yield value
    real = Redis.from_url(REDIS_URL)
    keys = [k async for k in real.scan_iter(match=f"{value}*")]
    if keys:
        await real.delete(*keys)
    await real.aclose()


async def test_concurrent_callers_share_one_connection_and_get_their_own_replies(
    pipelined: PipelinedRedis, prefix: str
) -> None:
    keys = [f"{prefix}k{i}" for i in range(300)]
    await asyncio.gather(*(pipelined.execute("SET", key, str(i)) for i, key in enumerate(keys)))
    values = await asyncio.gather(*(pipelined.execute("GET", key) for key in keys))
    assert values == [str(i).encode() for i in range(300)]
    assert pipelined.connects == 1


async def test_an_error_reply_fails_only_its_caller(pipelined: PipelinedRedis, prefix: str) -> None:
    results = await asyncio.gather(
        pipelined.execute("SET", f"{prefix}a", "1"),
        pipelined.execute("INCR", f"{prefix}missing-hash-as-string", "extra-arg"),  # wrong arity
        pipelined.execute("GET", f"{prefix}a"),
        return_exceptions=True,
    )
    assert results[0] == b"OK"
    assert isinstance(results[1], ResponseError)
    assert results[2] == b"1"
    assert await pipelined.ping()


async def test_decisions_stay_atomic_under_200_concurrent_callers(prefix: str) -> None:
    for algorithm in ALGORITHM_NAMES:
        limiter = build_limiter(algorithm, "redis", key_prefix=prefix, timeout_s=5.0, socket_timeout_s=5.0)
        limit = Limit(rate=50, period_s=3600.0, burst=50)
        decisions = await asyncio.gather(*(limiter.hit("hot", limit) for _ in range(200)))
        assert not any(d.degraded for d in decisions), algorithm
        assert sum(d.allowed for d in decisions) == 50, algorithm
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50)), algorithm


@contextlib.asynccontextmanager
async def numbering_server(release: asyncio.Event) -> AsyncIterator[int]:
    """A RESP server that answers the n-th command with the integer n, but only once `release` is set."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = 0
        buffered = b""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                buffered += data
                # Each of our commands is one RESP array starting with '*'.
                commands = buffered.count(b"*")
                await release.wait()
                writer.write(b"".join(b":%d\r\n" % (count + i + 1) for i in range(commands - count)))
                count = commands
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_a_caller_that_gives_up_keeps_its_place_in_the_reply_order() -> None:
    release = asyncio.Event()
    async with numbering_server(release) as port:
        client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", socket_timeout_s=2.0)
        try:
            first = asyncio.ensure_future(client.execute("PING"))
            second = asyncio.ensure_future(client.execute("PING"))
            third = asyncio.ensure_future(client.execute("PING"))
            await asyncio.sleep(0.05)
            second.cancel()  # its deadline passed before any reply came
            release.set()
            assert await first == 1
            assert await third == 3, "the third caller gets the third reply, not the second's"
            with pytest.raises(asyncio.CancelledError):
                await second
        finally:
            await client.aclose()


async def test_a_silent_server_fails_waiters_after_the_socket_timeout_and_the_next_call_reconnects() -> None:
    release = asyncio.Event()  # never set during the first call: the server reads and stays silent
    async with numbering_server(release) as port:
        client = PipelinedRedis(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.1)
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(RedisTimeoutError):
                await client.execute("PING")
            assert loop.time() - start < 0.5
            release.set()
            assert await client.execute("PING") == 1, "a new connection, numbered from 1 again"
            assert client.connects == 2
        finally:
            await client.aclose()


async def test_a_killed_connection_fails_its_waiters_and_the_next_call_reconnects(
    pipelined: PipelinedRedis,
) -> None:
    own_id = await pipelined.execute("CLIENT", "ID")
    admin = Redis.from_url(REDIS_URL)
    try:
        assert await admin.client_kill_filter(_id=own_id) == 1
    finally:
        await admin.aclose()
    # The kill reaches us as connection_lost; a call racing it fails with ConnectionError, never hangs.
    with contextlib.suppress(RedisConnectionError):
        await pipelined.execute("PING")
    assert await pipelined.ping()
    assert await pipelined.execute("CLIENT", "ID") != own_id
    assert pipelined.connects == 2


async def test_unreachable_redis_is_a_connection_error() -> None:
    client = PipelinedRedis("redis://127.0.0.1:1/0", socket_timeout_s=0.2)
    with pytest.raises(RedisConnectionError):
        await client.execute("PING")
    await client.aclose()


async def test_select_and_auth_come_from_the_url(prefix: str) -> None:
    key = f"{prefix}db3"
    client = PipelinedRedis("redis://127.0.0.1:6379/3", socket_timeout_s=1.0)
    try:
        await client.execute("SET", key, "x")
    finally:
        await client.aclose()
    db3 = Redis.from_url("redis://127.0.0.1:6379/3")
    try:
        assert await db3.get(key) == b"x"
        await db3.delete(key)
    finally:
        await db3.aclose()
    # This Redis has no password: an AUTH from the URL is refused, and the connection is not used.
    wrong = PipelinedRedis("redis://:not-the-password@127.0.0.1:6379/0", socket_timeout_s=1.0)
    with pytest.raises(ResponseError):
        await wrong.execute("PING")
    await wrong.aclose()


def test_it_runs_on_uvloop_as_served_by_uvicorn(prefix: str) -> None:
    async def decide() -> list[bool]:
        limiter = build_limiter(
            "token_bucket", "redis", key_prefix=prefix, timeout_s=5.0, socket_timeout_s=5.0
        )
        limit = Limit(rate=5, period_s=3600.0)
        return [d.allowed for d in await asyncio.gather(*(limiter.hit("k", limit) for _ in range(8)))]

    assert uvloop.run(decide()) == [True] * 5 + [False] * 3


def test_only_redis_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="scheme"):
        PipelinedRedis("http://127.0.0.1:6379/0")
