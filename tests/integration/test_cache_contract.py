"""One contract for both cache tiers (memory, and the real Redis on 127.0.0.1:6379), and the
cache-aside behaviours (single-flight, SWR, stale-if-error, negative caching, the fenced store
that defeats the delete-then-load race, XFetch) run over each tier.

Redis keys live under a unique prefix per test and are deleted afterwards (the server is shared).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from mercato.kit.cache import (
    Cache,
    CacheTtls,
    Entry,
    MemoryTier,
    RedisInvalidationBus,
    RedisTier,
    Tier,
    TinyLfuStore,
)
from mercato.kit.clock import ManualClock

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis(connection_pool=BlockingConnectionPool.from_url(REDIS_URL, max_connections=32, timeout=10))
    prefix = f"test-cache:{uuid.uuid4().hex}"
    client.test_prefix = prefix  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(params=["memory-lru", "memory-tinylfu", "redis"])
def tier(request: pytest.FixtureRequest, redis: Redis, clock: ManualClock) -> Tier:
    if request.param == "memory-lru":
        return MemoryTier(max_bytes=1 << 20, clock=clock)
    if request.param == "memory-tinylfu":
        return MemoryTier(TinyLfuStore(max_bytes=1 << 20, expected_entries=1000), clock=clock)
    return RedisTier(redis, prefix=redis.test_prefix, clock=clock)  # type: ignore[attr-defined]


def _entry(clock: ManualClock, value: bytes | None, fresh_s: float = 10, stale_s: float = 20) -> Entry:
    now = clock.now().timestamp()
    return Entry(value, now + fresh_s, now + fresh_s + stale_s, 0.01)


# --- the tier contract ---------------------------------------------------------------------


async def test_set_then_get_round_trips_value_and_timing(tier: Tier, clock: ManualClock) -> None:
    entry = _entry(clock, b'{"a": 1}')
    assert await tier.set("k", entry)
    got = await tier.get("k")
    assert got == entry
    assert await tier.get("other") is None


async def test_negative_entries_round_trip(tier: Tier, clock: ManualClock) -> None:
    assert await tier.set("gone", _entry(clock, None))
    got = await tier.get("gone")
    assert got is not None
    assert got.negative
    assert got.value is None


async def test_entry_past_its_stale_window_is_not_served(tier: Tier, clock: ManualClock) -> None:
    await tier.set("k", _entry(clock, b"v", fresh_s=1, stale_s=1))
    clock.advance(1.5)
    got = await tier.get("k")
    assert got is not None
    assert not got.fresh(clock.now().timestamp())
    clock.advance(1.0)
    assert await tier.get("k") is None


async def test_invalidate_drops_the_key_and_refuses_a_store_fenced_before_it(
    tier: Tier, clock: ManualClock
) -> None:
    await tier.set("k", _entry(clock, b"v1"))
    fence = await tier.fence("k")  # a reader starts loading the old row...
    await tier.invalidate("k")  # ...a writer commits and invalidates...
    assert await tier.get("k") is None
    assert not await tier.set("k", _entry(clock, b"old"), fence=fence)  # ...the old row is refused
    assert await tier.get("k") is None
    assert await tier.set("k", _entry(clock, b"v2"), fence=await tier.fence("k"))
    got = await tier.get("k")
    assert got is not None
    assert got.value == b"v2"


async def test_invalidating_one_key_leaves_other_fences_valid(tier: Tier, clock: ManualClock) -> None:
    fence = await tier.fence("a")
    await tier.invalidate("b")
    assert await tier.set("a", _entry(clock, b"a"), fence=fence)


async def test_invalidate_all_drops_everything_and_every_outstanding_fence(
    tier: Tier, clock: ManualClock
) -> None:
    await tier.set("a", _entry(clock, b"a"))
    await tier.set("b", _entry(clock, b"b"))
    fence = await tier.fence("c")
    await tier.invalidate_all()
    assert await tier.get("a") is None
    assert await tier.get("b") is None
    assert not await tier.set("c", _entry(clock, b"c"), fence=fence)


# --- cache-aside over each tier ------------------------------------------------------------


def _cache(tier: Tier, clock: ManualClock, **kwargs: object) -> Cache:
    ttls = CacheTtls(
        fresh_s=10, stale_while_revalidate_s=5, stale_if_error_s=60, negative_s=2, local_fresh_s=10
    )
    return Cache("test", local=tier, ttls=ttls, clock=clock, rng=random.Random(7), **kwargs)  # type: ignore[arg-type]


class Origin:
    def __init__(self, value: bytes | None = b"v1") -> None:
        self.value = value
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def load(self) -> bytes | None:
        self.calls += 1
        value = self.value  # the row as read when the load started
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("origin down")
        return value


async def test_single_flight_one_load_for_a_thousand_concurrent_misses(
    tier: Tier, clock: ManualClock
) -> None:
    cache, origin = _cache(tier, clock), Origin()
    origin.gate = asyncio.Event()
    readers = [asyncio.create_task(cache.get("hot", origin.load)) for _ in range(1000)]
    await asyncio.sleep(0.05)
    origin.gate.set()
    assert set(await asyncio.gather(*readers)) == {b"v1"}
    assert origin.calls == 1


async def test_without_single_flight_every_concurrent_miss_loads(tier: Tier, clock: ManualClock) -> None:
    cache, origin = _cache(tier, clock, single_flight=False), Origin()
    origin.gate = asyncio.Event()
    readers = [asyncio.create_task(cache.get("hot", origin.load)) for _ in range(50)]
    for _ in range(200):
        if origin.calls == 50:
            break
        await asyncio.sleep(0.01)
    origin.gate.set()
    await asyncio.gather(*readers)
    assert origin.calls == 50


async def test_hit_does_not_call_the_origin(tier: Tier, clock: ManualClock) -> None:
    cache, origin = _cache(tier, clock, xfetch=False), Origin()
    assert await cache.get("k", origin.load) == b"v1"
    origin.value = b"v2"
    assert await cache.get("k", origin.load) == b"v1"
    assert origin.calls == 1


async def test_not_found_is_cached_for_the_negative_ttl_only(tier: Tier, clock: ManualClock) -> None:
    cache, origin = _cache(tier, clock, xfetch=False), Origin(None)
    assert await cache.get("missing", origin.load) is None
    assert await cache.get("missing", origin.load) is None
    assert origin.calls == 1
    origin.value = b"created"
    clock.advance(2.5)
    assert await cache.get("missing", origin.load) == b"created"


async def test_stale_while_revalidate_serves_stale_then_the_refreshed_value(
    tier: Tier, clock: ManualClock
) -> None:
    cache, origin = _cache(tier, clock, xfetch=False), Origin()
    await cache.get("k", origin.load)
    origin.value = b"v2"
    clock.advance(12)  # past fresh (10), inside the SWR window (5)
    assert await cache.get("k", origin.load) == b"v1"  # served stale, refresh started
    for _ in range(100):
        if origin.calls == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert await cache.get("k", origin.load) == b"v2"
    assert origin.calls == 2


async def test_stale_if_error_serves_the_last_value_when_the_origin_fails(
    tier: Tier, clock: ManualClock
) -> None:
    cache, origin = _cache(tier, clock, xfetch=False), Origin()
    await cache.get("k", origin.load)
    origin.fail = True
    clock.advance(20)  # past the SWR window, within stale-if-error (60)
    assert await cache.get("k", origin.load) == b"v1"
    clock.advance(60)  # past stale-if-error: the error propagates
    with pytest.raises(ConnectionError):
        await cache.get("k", origin.load)


async def test_invalidation_during_a_load_is_not_undone_by_that_load(tier: Tier, clock: ManualClock) -> None:
    """The delete-then-load race: the load read the old row before the write; it must not be stored."""
    cache, origin = _cache(tier, clock, xfetch=False), Origin(b"old")
    origin.gate = asyncio.Event()
    reader = asyncio.create_task(cache.get("k", origin.load))
    await asyncio.sleep(0.02)  # the reader is inside its load, holding the old row
    origin.value = b"new"
    await cache.invalidate("k")
    origin.gate.set()
    assert await reader == b"old"  # that read began before the write: fine to answer
    assert await cache.get("k", origin.load) == b"new"  # but it was not stored
    assert origin.calls == 2


async def test_xfetch_refreshes_a_hot_key_before_it_expires(tier: Tier, clock: ManualClock) -> None:
    cache, origin = _cache(tier, clock), Origin()
    origin_delay = 0.5

    async def slow_load() -> bytes | None:
        clock.advance(origin_delay)  # the load "takes" 0.5 s of the cache's clock
        return await origin.load()

    await cache.get("k", slow_load)
    clock.advance(9.0)  # 0.5 s before expiry: with delta 0.5 s, XFetch fires for most readers
    served = [await cache.get("k", slow_load) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert served == [b"v1"] * 20  # every reader got the fresh value, none waited
    assert origin.calls == 2  # and exactly one early refresh ran (single-flight)


async def test_two_processes_share_redis_and_an_invalidation_reaches_the_others_local_tier(
    redis: Redis, clock: ManualClock
) -> None:
    prefix = redis.test_prefix  # type: ignore[attr-defined]
    buses = [RedisInvalidationBus(redis, channel=f"{prefix}:bus") for _ in range(2)]
    for bus in buses:
        await bus.start()
    try:
        caches = [
            Cache(
                "products",
                local=MemoryTier(max_bytes=1 << 20, clock=clock),
                shared=RedisTier(redis, prefix=prefix, clock=clock),
                bus=bus,
                clock=clock,
                xfetch=False,
            )
            for bus in buses
        ]
        origin = Origin(b"v1")
        assert await caches[0].get("p", origin.load) == b"v1"
        assert await caches[1].get("p", origin.load) == b"v1"  # from Redis, into its local tier
        assert origin.calls == 1
        origin.value = b"v2"
        await caches[0].invalidate("p")
        for _ in range(100):
            if await caches[1].get("p", origin.load) == b"v2":
                break
            await asyncio.sleep(0.01)
        assert await caches[1].get("p", origin.load) == b"v2"
    finally:
        for bus in buses:
            await bus.aclose()
