"""One contract for every algorithm on every backend: memory, and the real Redis on 127.0.0.1:6379.

Two kinds of check:
- scripted: the same timeline replayed on memory and on Redis (Redis with its test switch: `now` from a
  ManualClock instead of the server's TIME) must give the same decisions;
- server time: timing-tolerant properties with Redis's own clock (burst admitted, then refused with a
  positive retry_after, remaining decreasing, reset within the period, keys expiring).
Keys live under a unique prefix per run and are deleted afterwards (the server is shared).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis

from mercato.kit.clock import ManualClock
from mercato.kit.ratelimit import (
    ALGORITHM_NAMES,
    ALGORITHMS,
    Limit,
    MemoryLimiter,
    PipelinedRedis,
    RateLimiter,
    RedisLimiter,
    build_limiter,
)
from mercato.kit.ratelimit.redis_backend import _Script, load_script_source

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["redis-py", "pipelined"])
async def store(request: pytest.FixtureRequest, redis: Redis) -> AsyncIterator[Redis | PipelinedRedis]:
    """The client the Redis limiter runs its scripts on: redis-py, or the auto-pipelined connection."""
    if request.param == "redis-py":
        yield redis
        return
    pipelined = PipelinedRedis(REDIS_URL, socket_timeout_s=1.0)
    try:
        yield pipelined
    finally:
        await pipelined.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    """A key prefix no one else uses; everything under it is deleted after the test."""
    value = f"test:ratelimit:{uuid.uuid4().hex}:"
    yield value
    keys = [key async for key in redis.scan_iter(match=f"{value}*", count=500)]
    if keys:
        await redis.delete(*keys)


def make(algorithm: str, backend: str, store: Redis | PipelinedRedis, prefix: str) -> RateLimiter:
    return build_limiter(algorithm, backend, redis_client=store, key_prefix=prefix, fail_open=False)


async def hits(limiter: RateLimiter, key: str, limit: Limit, n: int) -> list[Any]:
    return [await limiter.hit(key, limit) for _ in range(n)]


# --- scripted timeline: identical decisions ----------------------------------------------------------------

# (seconds to advance, cost): bursts, refusals, partial refills, window boundaries and long idle gaps.
_REAL_TIME_SLACK_S = 0.25

SCRIPT = [(0.0, 1)] * 7 + [(0.1, 1), (0.3, 2), (0.05, 1), (0.6, 1), (0.0, 1), (1.2, 3), (0.0, 1)]
SCRIPT += [(0.25, 1)] * 12 + [(5.0, 2), (0.0, 2), (0.0, 2), (0.01, 1), (2.0, 1)]


@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
async def test_memory_and_redis_decide_identically_on_a_scripted_timeline(
    algorithm: str, store: Redis | PipelinedRedis, prefix: str
) -> None:
    limit = Limit(rate=4, period_s=1.0, burst=6)
    memory_clock, redis_clock = ManualClock(), ManualClock()
    memory = MemoryLimiter(ALGORITHMS[algorithm], clock=memory_clock)
    remote = RedisLimiter(algorithm, client=store, key_prefix=prefix, clock=redis_clock)
    # Start far from 0 like a real clock, so window arithmetic on large times is exercised too.
    for clock in (memory_clock, redis_clock):
        clock.advance(1_700_000_000.0)
    outcomes = set()
    for advance_s, cost in SCRIPT:
        memory_clock.advance(advance_s)
        redis_clock.advance(advance_s)
        expected = await memory.hit("k", limit, cost=cost)
        got = await remote.hit("k", limit, cost=cost)
        assert (got.allowed, got.limit, got.remaining) == (
            expected.allowed,
            expected.limit,
            expected.remaining,
        )
        assert got.reset_after_s == pytest.approx(expected.reset_after_s, abs=1e-6)
        assert got.retry_after_s == pytest.approx(expected.retry_after_s, abs=1e-6)
        peeked, remote_peek = await memory.peek("k", limit), await remote.peek("k", limit)
        # Redis expires the key in real time (PEXPIRE) while this test's clocks stand still: a state
        # due to reset within milliseconds may already be gone when the peek arrives on a loaded
        # machine. Compare peeks only where the key has real time to spare.
        if expected.reset_after_s > _REAL_TIME_SLACK_S:
            assert (remote_peek.allowed, remote_peek.remaining) == (peeked.allowed, peeked.remaining)
        outcomes.add(got.allowed)
    assert outcomes == {True, False}, "the script must exercise both admissions and refusals"


# --- server time: timing-tolerant properties ---------------------------------------------------------------

# A long period, so that no refill or window boundary can fall inside the few milliseconds a test takes.
LONG = Limit(rate=5, period_s=3600.0, burst=5)


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
async def test_burst_is_admitted_then_refused_with_consistent_headers(
    algorithm: str, backend: str, store: Redis | PipelinedRedis, prefix: str
) -> None:
    limiter = make(algorithm, backend, store, prefix)
    first = await limiter.peek("k", LONG)
    assert (first.allowed, first.remaining, first.limit) == (True, 5, 5)
    decisions = await hits(limiter, "k", LONG, 7)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0], "remaining counts down, never up"
    # Relative slack for float rounding of `(capacity - tokens) / rate` and the like at large clock values.
    span = (2 * LONG.period_s if algorithm == "sliding_window" else LONG.period_s) * (1 + 1e-12)
    for d in decisions:
        assert not d.degraded
        assert d.limit == 5
        assert 0 < d.reset_after_s <= span
        assert d.retry_after_s == 0 if d.allowed else 0 < d.retry_after_s <= span
        assert int(d.headers()["RateLimit-Reset"]) <= round(span)
    assert decisions[-1].headers()["Retry-After"].isdigit()
    # Keys are independent.
    assert (await limiter.hit("other", LONG)).allowed


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
async def test_cost_consumes_several_units_and_refuses_what_does_not_fit(
    algorithm: str, backend: str, store: Redis | PipelinedRedis, prefix: str
) -> None:
    limiter = make(algorithm, backend, store, prefix)
    assert (await limiter.hit("k", LONG, cost=3)).remaining == 2
    refused = await limiter.hit("k", LONG, cost=3)
    assert (refused.allowed, refused.remaining) == (False, 2)
    assert refused.retry_after_s > 0
    assert (await limiter.hit("k", LONG, cost=2)).allowed
    with pytest.raises(ValueError, match="cost"):
        await limiter.hit("k", LONG, cost=6)


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
async def test_quota_comes_back_after_the_period(
    algorithm: str, backend: str, store: Redis | PipelinedRedis, prefix: str
) -> None:
    limiter = make(algorithm, backend, store, prefix)
    short = Limit(rate=2, period_s=0.2)
    assert [d.allowed for d in await hits(limiter, "k", short, 3)][:2] == [True, True]
    await asyncio.sleep(0.45)  # longer than two periods: even the sliding counter has forgotten
    assert (await limiter.hit("k", short)).allowed


# --- Redis specifics ---------------------------------------------------------------------------------------


class CountingRedis(Redis):
    """Counts commands sent (each is one round trip: no pipelines are used by the limiter)."""

    commands: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest.fixture
async def counting() -> AsyncIterator[CountingRedis]:
    client = CountingRedis(connection_pool=ConnectionPool.from_url(REDIS_URL))
    client.commands = []
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
async def test_one_round_trip_per_decision(algorithm: str, counting: CountingRedis, prefix: str) -> None:
    limiter = RedisLimiter(algorithm, client=counting, key_prefix=prefix)
    await limiter.hit("warm-up", LONG)  # may load the script (NOSCRIPT -> SCRIPT LOAD -> EVALSHA)
    counting.commands.clear()
    for i in range(20):
        await limiter.hit(f"k{i % 3}", LONG)
        await limiter.peek(f"k{i % 3}", LONG)
    assert counting.commands == ["EVALSHA"] * 40


async def test_noscript_is_handled_by_loading_once(counting: CountingRedis, prefix: str) -> None:
    limiter = RedisLimiter("token_bucket", client=counting, key_prefix=prefix)
    # A script the server has never seen (a unique comment changes its SHA), as after a restart or a
    # SCRIPT FLUSH; flushing for real would break the other users of this shared server.
    fresh = _Script(load_script_source("token_bucket") + f"\n-- {uuid.uuid4().hex}\n")
    limiter._script = fresh
    assert (await limiter.hit("k", LONG)).allowed
    assert counting.commands == ["EVALSHA", "SCRIPT LOAD", "EVALSHA"]
    counting.commands.clear()
    assert (await limiter.hit("k", LONG)).remaining == 3
    assert counting.commands == ["EVALSHA"]


class CountingPipelined(PipelinedRedis):
    """Records each command's name from the packed payload it sends (what reaches the wire)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, socket_timeout_s=1.0)
        self.commands: list[str] = []

    async def execute_packed(self, payload: bytes) -> Any:
        name = payload.split(b"\r\n")[2].decode()
        self.commands.append("SCRIPT LOAD" if name == "SCRIPT" else name)
        return await super().execute_packed(payload)


async def test_noscript_on_the_pipelined_hot_path_loads_once_and_packs_the_same_command(prefix: str) -> None:
    client = CountingPipelined(REDIS_URL)
    try:
        limiter = RedisLimiter("token_bucket", client=client, key_prefix=prefix)
        limiter._script = _Script(load_script_source("token_bucket") + f"\n-- {uuid.uuid4().hex}\n")
        limit = Limit(rate=4, period_s=60.0)
        assert (await limiter.hit("k", limit)).remaining == 3
        assert client.commands == ["EVALSHA", "SCRIPT LOAD", "EVALSHA"]
        client.commands.clear()
        # A second limit and a cost of 2 get their own packed arguments, not the first one's.
        assert (await limiter.hit("k", limit, cost=2)).remaining == 1
        assert (await limiter.hit("other", Limit(rate=9, period_s=60.0))).remaining == 8
        assert (await limiter.peek("k", limit)).remaining == 1, "a peek consumes nothing"
        assert client.commands == ["EVALSHA"] * 3
    finally:
        await client.aclose()


@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
async def test_every_key_has_a_ttl_no_longer_than_its_state_matters(
    algorithm: str, redis: Redis, prefix: str
) -> None:
    limiter = RedisLimiter(algorithm, client=redis, key_prefix=prefix)
    limit = Limit(rate=3, period_s=2.0)
    await limiter.hit("k", limit)
    ttl_ms = await redis.pttl(limiter.redis_key("k"))
    bound_ms = 2 * 2000 + 2 if algorithm == "sliding_window" else 2000 + 2
    assert 0 < ttl_ms <= bound_ms
    # Only one key per limiter key (cluster-safe, nothing left behind).
    assert [k async for k in redis.scan_iter(match=f"{prefix}*")] == [limiter.redis_key("k").encode()]


async def test_keys_vanish_when_idle(redis: Redis, prefix: str) -> None:
    # A period long enough that no key expires before the first scan on a loaded machine (0.1 s did).
    limit = Limit(rate=2, period_s=1.0)
    limiters = [RedisLimiter(a, client=redis, key_prefix=prefix) for a in ALGORITHM_NAMES]
    for limiter in limiters:
        await limiter.hit("k", limit)
    assert len([k async for k in redis.scan_iter(match=f"{prefix}*")]) == len(limiters)
    await asyncio.sleep(2.2)  # the longest TTL is the sliding counter's two periods (+ rounding)
    assert [k async for k in redis.scan_iter(match=f"{prefix}*")] == []


@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
async def test_200_concurrent_hits_admit_exactly_the_limit(algorithm: str, prefix: str) -> None:
    # 32 connections for 200 callers: real interleaving on the server, callers queueing for a connection.
    client = Redis(connection_pool=BlockingConnectionPool.from_url(REDIS_URL, max_connections=32, timeout=5))
    try:
        limiter = build_limiter(
            algorithm, "redis", redis_client=client, key_prefix=prefix, timeout_s=5.0, fail_open=False
        )
        limit = Limit(rate=50, period_s=3600.0, burst=50)
        decisions = await asyncio.gather(*(limiter.hit("hot", limit) for _ in range(200)))
        assert not any(d.degraded for d in decisions)
        assert sum(d.allowed for d in decisions) == 50
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))
    finally:
        await client.aclose()
