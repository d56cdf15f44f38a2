"""The cache's storage port (`Tier`) and its two adapters: in-process memory and Redis.

The delete-then-load race: a reader misses, reads the old row, a writer commits and invalidates,
then the reader stores what it read: the old version is resurrected until its TTL. Each tier
prevents it with a **fence** (Facebook's memcache leases, simplified): `fence(key)` is captured
before the load, and `set(..., fence=...)` stores only if no invalidation of that key (or of the
whole tier) happened since. Memory: a per-tier invalidation counter and the tick of each key's
last invalidation. Redis: a per-key generation counter (`INCR` on invalidate) and a tier epoch,
compared and written in one Lua call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol, runtime_checkable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mercato.kit.cache.entry import Entry, Fence
from mercato.kit.cache.hooks import CacheHooks, NoCacheHooks
from mercato.kit.cache.policies import ByteStore, LruStore
from mercato.kit.clock import Clock, SystemClock

__all__ = ["MemoryTier", "RedisTier", "Tier"]


@runtime_checkable
class Tier(Protocol):
    name: str

    async def get(self, key: str) -> Entry | None:
        """The entry if it is still servable (fresh or within its stale window), else None."""
        ...

    async def fence(self, key: str) -> Fence:
        """Capture before loading `key`; hand to `set`."""
        ...

    async def set(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        """Store `entry` (kept until its `stale_until`); with a fence, only if `key` was not
        invalidated since the fence was taken. Returns whether it was stored."""
        ...

    async def invalidate(self, key: str) -> None:
        """Drop `key` and make every outstanding fence on it stale."""
        ...

    async def invalidate_all(self) -> None:
        """Drop everything (a new epoch); every outstanding fence becomes stale."""
        ...


class MemoryTier:
    """Entries in a byte-bounded store (`LruStore` by default, or `TinyLfuStore`).

    Remembers the last `remember` invalidated keys; when it forgets one, every fence older than
    that invalidation is treated as stale (conservative: a store is refused, never wrongly allowed).
    """

    def __init__(
        self,
        store: ByteStore | None = None,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        name: str = "memory",
        clock: Clock | None = None,
        hooks: CacheHooks | None = None,
        remember: int = 65_536,
    ) -> None:
        self.name = name
        self._store = store if store is not None else LruStore(max_bytes=max_bytes)
        self._clock = clock or SystemClock()
        self._now = time.time if type(self._clock) is SystemClock else self._clock_now
        self._hooks = hooks or NoCacheHooks()
        self._tick = 0
        self._epoch = 0
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._forgotten_tick = 0
        self._remember = remember

    def _clock_now(self) -> float:
        return self._clock.now().timestamp()

    def peek(self, key: str, now: float) -> Entry | None:
        """`get` without the coroutine, at a time the caller already read (the cache's hit path)."""
        entry = self._store.get(key)
        if not isinstance(entry, Entry):
            return None
        if now >= entry.stale_until:
            self._store.delete(key)
            return None
        return entry

    async def get(self, key: str) -> Entry | None:
        return self.peek(key, self._now())

    async def fence(self, key: str) -> Fence:
        return (self._epoch, self._tick)

    async def set(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        if fence is not None:
            epoch, tick = fence
            if epoch != self._epoch or tick < self._forgotten_tick:
                return False
            if self._invalidated.get(key, -1) > tick:
                return False
        evicted = self._store.put(key, entry, entry.size)
        if evicted:
            self._hooks.evicted(self.name, evicted)
        self._hooks.size(self.name, len(self._store), self._store.nbytes)
        return True

    async def invalidate(self, key: str) -> None:
        self._tick += 1
        self._store.delete(key)
        self._invalidated[key] = self._tick
        self._invalidated.move_to_end(key)
        while len(self._invalidated) > self._remember:
            _, tick = self._invalidated.popitem(last=False)
            self._forgotten_tick = max(self._forgotten_tick, tick)

    async def invalidate_all(self) -> None:
        self._epoch += 1
        self._tick += 1
        self._store.clear()
        self._invalidated.clear()
        self._hooks.size(self.name, 0, 0)


# KEYS[1] entry, KEYS[2] its generation, KEYS[3] the epoch; ARGV: value, ttl ms, fenced, gen, epoch.
_SET_FENCED = """
if ARGV[3] == '1' then
  local gen = tonumber(redis.call('GET', KEYS[2]) or '0')
  local epoch = tonumber(redis.call('GET', KEYS[3]) or '0')
  if gen ~= tonumber(ARGV[4]) or epoch ~= tonumber(ARGV[5]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


# A fence no epoch ever equals: what `fence` returns while Redis is unreachable (nothing is stored).
_UNFENCEABLE: Fence = (-1, -1)


class RedisTier:
    """Entries shared by every process, under `<prefix>:<epoch>:e:<key>` (versioned keys: a new
    epoch makes every old entry unreachable at once, and Redis's TTLs reclaim them).

    Generations live `generation_ttl_s` (longer than any load), so they do not accumulate.

    Redis unreachable: reads are misses and stores are skipped (the origin serves, slower), but
    `invalidate` raises: the caller must know the shared copy may still be there (the stream
    consumer then retries the event until Redis is back).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "mercato:cache",
        name: str = "redis",
        clock: Clock | None = None,
        generation_ttl_s: float = 3600.0,
    ) -> None:
        self.name = name
        self._redis = redis
        self._prefix = prefix
        self._clock = clock or SystemClock()
        self._generation_ttl_ms = int(generation_ttl_s * 1000)
        self._set = redis.register_script(_SET_FENCED)
        self._epoch_key = f"{prefix}:epoch"

    def _gen_key(self, key: str) -> str:
        return f"{self._prefix}:g:{key}"

    def _entry_key(self, epoch: int, key: str) -> str:
        return f"{self._prefix}:{epoch}:e:{key}"

    async def _current_epoch(self) -> int:
        return int(await self._redis.get(self._epoch_key) or 0)

    async def get(self, key: str) -> Entry | None:
        try:
            epoch = await self._current_epoch()
            raw = await self._redis.get(self._entry_key(epoch, key))
        except (RedisError, OSError):
            return None
        if raw is None:
            return None
        entry = Entry.decode(raw if isinstance(raw, bytes) else raw.encode("latin-1"))
        return entry if entry.servable(self._clock.now().timestamp()) else None

    async def fence(self, key: str) -> Fence:
        try:
            epoch, gen = await self._redis.mget([self._epoch_key, self._gen_key(key)])
        except (RedisError, OSError):
            return _UNFENCEABLE
        return (int(epoch or 0), int(gen or 0))

    async def set(self, key: str, entry: Entry, *, fence: Fence | None = None) -> bool:
        ttl_ms = int((entry.stale_until - self._clock.now().timestamp()) * 1000)
        if ttl_ms <= 0:
            return False
        if fence == _UNFENCEABLE:
            return False
        try:
            epoch, gen = fence if fence is not None else (await self._current_epoch(), 0)
            stored = await self._set(
                keys=[self._entry_key(epoch, key), self._gen_key(key), self._epoch_key],
                args=[entry.encode(), ttl_ms, "1" if fence is not None else "0", gen, epoch],
            )
        except (RedisError, OSError):
            return False
        return bool(stored)

    async def invalidate(self, key: str) -> None:
        epoch = await self._current_epoch()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(self._gen_key(key))
            pipe.pexpire(self._gen_key(key), self._generation_ttl_ms)
            pipe.delete(self._entry_key(epoch, key))
            await pipe.execute()

    async def invalidate_all(self) -> None:
        await self._redis.incr(self._epoch_key)
