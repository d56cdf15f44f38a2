"""Redis unreachable or silent: fail open/closed by policy, behind a breaker that stops calling, recovers.

"Unreachable" is a real closed port; "silent" is a real socket that accepts and never answers; "fixed" is a
TCP forwarder started on the closed port that relays to the real Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from mercato.kit.clock import ManualClock
from mercato.kit.health import HealthRegistry
from mercato.kit.ports import free_port
from mercato.kit.ratelimit import (
    BreakerState,
    Limit,
    PipelinedRedis,
    PrometheusRateLimitMetrics,
    RedisLimiter,
    ResilientLimiter,
    build_limiter,
    redis_client_for_limiter,
)

LIMIT = Limit(rate=3, period_s=3600.0)


class CountingRedis(Redis):
    attempts = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.attempts += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest.fixture
def port() -> int:
    return free_port()


class CountingPipelined(PipelinedRedis):
    attempts = 0

    async def execute_packed(self, payload: bytes) -> Any:  # every command goes through it
        self.attempts += 1
        return await super().execute_packed(payload)


Counting = CountingRedis | CountingPipelined


@pytest.fixture(params=["redis-py", "pipelined"])
async def client(request: pytest.FixtureRequest, port: int) -> AsyncIterator[Counting]:
    """The limiter's store client, both kinds: redis-py, and the auto-pipelined connection (ADR 0020)."""
    url = f"redis://127.0.0.1:{port}/0"
    counting: Counting
    if request.param == "redis-py":
        built = redis_client_for_limiter(url, socket_timeout_s=0.05)
        counting = CountingRedis(connection_pool=built.connection_pool)
    else:
        counting = CountingPipelined(url, socket_timeout_s=0.05)
    try:
        yield counting
    finally:
        await counting.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"test:ratelimit:{uuid.uuid4().hex}:"
    yield value
    real = Redis.from_url("redis://127.0.0.1:6379/0")
    keys = [k async for k in real.scan_iter(match=f"{value}*")]
    if keys:
        await real.delete(*keys)
    await real.aclose()


@contextlib.asynccontextmanager
async def forwarder(port: int) -> AsyncIterator[None]:
    """Relay 127.0.0.1:`port` to the real Redis: the 'port fixed' moment."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    writers: list[asyncio.StreamWriter] = []

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", 6379)
        writers.extend((client_w, redis_w))
        await asyncio.gather(pipe(client_r, redis_w), pipe(redis_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for writer in writers:  # Server.close_clients() is Python 3.13+
            writer.close()
        await server.wait_closed()


def state_of(limiter: ResilientLimiter) -> BreakerState:
    """Read through a function so the type checker does not narrow the state across awaits."""
    return limiter.breaker.state


def resilient(
    client: Redis | PipelinedRedis, prefix: str, clock: ManualClock, *, fail_open: bool, **kw: Any
) -> ResilientLimiter:
    limiter = build_limiter(
        "token_bucket",
        "redis",
        redis_client=client,
        key_prefix=prefix,
        fail_open=fail_open,
        failure_threshold=3,
        reset_timeout_s=5.0,
        clock=clock,
        **kw,
    )
    assert isinstance(limiter, ResilientLimiter)
    return limiter


async def test_fail_open_admits_degraded_and_fail_closed_refuses(client: Counting, prefix: str) -> None:
    clock = ManualClock()
    opened = resilient(client, prefix, clock, fail_open=True)
    closed = resilient(client, prefix, clock, fail_open=False)
    allow = await opened.hit("k", LIMIT)
    deny = await closed.hit("k", LIMIT)
    assert (allow.allowed, allow.degraded, allow.limit) == (True, True, 3)
    assert (deny.allowed, deny.degraded, deny.remaining) == (False, True, 0)
    assert deny.retry_after_s > 0
    assert "Retry-After" in deny.headers()


async def test_breaker_stops_calling_after_n_failures_then_recovers_when_the_port_is_fixed(
    client: Counting, port: int, prefix: str
) -> None:
    clock = ManualClock()
    registry = CollectorRegistry()
    metrics = PrometheusRateLimitMetrics(registry)
    limiter = resilient(client, prefix, clock, fail_open=False, metrics=metrics)
    health = HealthRegistry(timeout_s=1.0)
    health.add_check("ratelimit", limiter.readiness_check)

    def sample(name: str, **labels: str) -> float:
        return (
            registry.get_sample_value(name, {"algorithm": "token_bucket", "backend": "redis", **labels}) or 0
        )

    decisions = [await limiter.hit("k", LIMIT) for _ in range(10)]
    assert all(d.degraded and not d.allowed for d in decisions)
    assert client.attempts == 3, "after 3 consecutive failures the store is not called any more"
    assert state_of(limiter) is BreakerState.OPEN
    assert not limiter.healthy()
    assert [r.ok for r in await health.readiness()] == [False]
    assert sample("mercato_ratelimit_backend_errors_total", error="BackendError") == 3
    assert sample("mercato_ratelimit_degraded") == 1
    assert sample("mercato_ratelimit_decisions_total", outcome="degraded_limited") == 10

    async with forwarder(port):
        assert (await limiter.hit("k", LIMIT)).degraded, "still open: no call before reset_timeout_s"
        assert client.attempts == 3
        clock.advance(5.0)
        recovered = await limiter.hit("k", LIMIT)  # the half-open trial reaches Redis and succeeds
        assert (recovered.allowed, recovered.degraded, recovered.remaining) == (True, False, 2)
        assert limiter.healthy()
        assert state_of(limiter) is BreakerState.CLOSED
        assert [r.ok for r in await health.readiness()] == [True]
        assert sample("mercato_ratelimit_degraded") == 0
        assert sample("mercato_ratelimit_decisions_total", outcome="allowed") == 1
        await client.aclose()  # drop pooled connections before the forwarder goes away


async def test_failed_trial_reopens_the_breaker(client: Counting, prefix: str) -> None:
    clock = ManualClock()
    limiter = resilient(client, prefix, clock, fail_open=True)
    for _ in range(3):
        await limiter.hit("k", LIMIT)
    clock.advance(5.0)
    assert (await limiter.hit("k", LIMIT)).degraded  # trial call, port still closed
    assert client.attempts == 4
    assert state_of(limiter) is BreakerState.OPEN
    clock.advance(4.9)
    await limiter.hit("k", LIMIT)
    assert client.attempts == 4, "re-opened for a full reset_timeout_s"


@pytest.mark.parametrize("kind", ["redis-py", "pipelined"])
async def test_a_silent_redis_times_out_quickly(kind: str, prefix: str) -> None:
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):  # accepts, reads, never answers
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    silent: Redis | PipelinedRedis = (
        redis_client_for_limiter(url, socket_timeout_s=0.05)
        if kind == "redis-py"
        else PipelinedRedis(url, socket_timeout_s=0.05)
    )
    try:
        limiter = resilient(silent, prefix, ManualClock(), fail_open=True, timeout_s=1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        decision = await limiter.hit("k", LIMIT)
        assert decision.degraded
        assert decision.allowed
        assert loop.time() - start < 0.5, "the socket timeout, not a hang, decides"
    finally:
        await silent.aclose()
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_a_healthy_store_is_not_degraded(prefix: str) -> None:
    real = redis_client_for_limiter("redis://127.0.0.1:6379/0", socket_timeout_s=0.5)
    try:
        limiter = resilient(real, prefix, ManualClock(), fail_open=False)
        assert isinstance(limiter.inner, RedisLimiter)
        decisions = [await limiter.hit("k", LIMIT) for _ in range(4)]
        assert [(d.allowed, d.degraded) for d in decisions] == [(True, False)] * 3 + [(False, False)]
        assert limiter.healthy()
    finally:
        await real.aclose()
