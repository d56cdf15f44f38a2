"""Cache-aside over one or two tiers, with single-flight, XFetch, stale-while-revalidate,
stale-if-error and negative caching.

`get(key, loader)` looks in the local tier, then the shared one, and only then calls `loader`:

- **single-flight**: one load per key per process; concurrent callers await the same task.
- **XFetch** (Vattani, Chierichetti & Lowenstein 2015): a fresh hit is treated as due when
  `now - delta_s * beta * ln(U) >= fresh_until` (U uniform in (0, 1], delta_s the last load's
  duration), so across many processes about one reader refreshes a hot key shortly before it
  expires, instead of all of them at once after it did. The refresh runs in the background
  (single-flight); the caller is served the still-fresh value.
- **stale-while-revalidate**: an entry past `fresh_until` but before `stale_until` is served
  while one background refresh runs.
- **stale-if-error**: when the load fails and a stale entry is within `stale_if_error_s` of its
  freshness, it is served (and counted); otherwise the error propagates.
- **negative caching**: a loader returning None ("not found") is remembered for `negative_ttl_s`.
- **fenced stores**: every store carries the fence taken before the load, so an invalidation
  during the load wins (tiers.py explains the race).

Invalidation: `invalidate(key)` drops the key in both tiers here and tells every other process
through the `InvalidationBus` (which drops it from their local tiers).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mercato.kit.cache.bus import InvalidationBus
from mercato.kit.cache.entry import Entry, Fence
from mercato.kit.cache.hooks import CacheHooks, NoCacheHooks
from mercato.kit.cache.staleness import record_staleness
from mercato.kit.cache.tiers import MemoryTier, Tier
from mercato.kit.clock import Clock, SystemClock

__all__ = ["Cache", "CacheTtls", "Loader"]

Loader = Callable[[], Awaitable[bytes | None]]


@dataclass(frozen=True, slots=True)
class CacheTtls:
    """Seconds: `fresh_s` fresh; then `stale_while_revalidate_s` served while refreshing;
    `stale_if_error_s` (from the end of freshness) served when the origin fails; `local_fresh_s`
    caps freshness in the local tier (bounded staleness if an invalidation message is lost);
    `negative_s` for a cached "not found"."""

    fresh_s: float = 60.0
    stale_while_revalidate_s: float = 30.0
    stale_if_error_s: float = 300.0
    negative_s: float = 5.0
    local_fresh_s: float = 30.0
    xfetch_beta: float = 1.0


class Cache:
    def __init__(
        self,
        name: str,
        *,
        local: Tier | None,
        shared: Tier | None = None,
        ttls: CacheTtls | None = None,
        bus: InvalidationBus | None = None,
        clock: Clock | None = None,
        hooks: CacheHooks | None = None,
        rng: random.Random | None = None,
        single_flight: bool = True,
        xfetch: bool = True,
    ) -> None:
        if local is None and shared is None:
            raise ValueError("a cache needs at least one tier")
        self.name = name
        self._local = local
        self._shared = shared
        self.ttls = ttls or CacheTtls()
        self._bus = bus
        self._clock = clock or SystemClock()
        # Wall-clock seconds: `time.time` itself on the system clock (no datetime per lookup).
        self._now = time.time if type(self._clock) is SystemClock else self._clock_now
        # A memory local tier is read synchronously on the hit path (no coroutine per lookup).
        self._memory = local if isinstance(local, MemoryTier) else None
        self._hooks = hooks or NoCacheHooks()
        self._rng = rng or random.Random()
        self._single_flight = single_flight
        self._xfetch = xfetch
        self._flights: dict[str, asyncio.Task[Entry]] = {}
        self._background: set[asyncio.Task[Entry]] = set()
        self.loads = 0  # loader calls made by this instance (labs and tests read it)
        if bus is not None:
            bus.subscribe(name, self._on_broadcast)

    def _clock_now(self) -> float:
        return self._clock.now().timestamp()

    async def get(self, key: str, loader: Loader) -> bytes | None:
        """The value for `key` (None: the origin said not found), loading it on a miss."""
        memory = self._memory
        if memory is not None:
            # The hot path: a fresh entry in the memory tier, exactly what `_lookup` would return first.
            now = self._now()
            entry = memory.peek(key, now)
            if entry is not None and now < entry.fresh_until:
                self._hooks.lookup(self.name, memory.name, "negative" if entry.value is None else "hit")
                if self._xfetch and self._due_early(entry, now):
                    self._refresh_in_background(key, loader, entry)
                return entry.value
        entry, tier = await self._lookup(key)
        now = self._now()
        if entry is not None and entry.fresh(now):
            self._hooks.lookup(self.name, tier, "negative" if entry.negative else "hit")
            if self._xfetch and self._due_early(entry, now):
                self._refresh_in_background(key, loader, entry)
            return entry.value
        self._hooks.lookup(self.name, tier, "miss")
        if entry is not None and now < entry.fresh_until + self.ttls.stale_while_revalidate_s:
            self._hooks.stale_served(self.name, "revalidate")
            record_staleness(now - entry.fresh_until, "revalidate")
            self._refresh_in_background(key, loader, entry)
            return entry.value
        try:
            return (await self._load(key, loader)).value
        except Exception:
            if entry is not None and now < entry.fresh_until + self.ttls.stale_if_error_s:
                self._hooks.stale_served(self.name, "error")
                record_staleness(now - entry.fresh_until, "error")
                return entry.value
            raise

    async def _lookup(self, key: str) -> tuple[Entry | None, str]:
        """The freshest servable entry: local first; a shared one is copied into the local tier."""
        local = await self._local.get(key) if self._local is not None else None
        now = self._now()
        if (local is not None and local.fresh(now)) or self._shared is None:
            return local, self._local.name if self._local is not None else "none"
        fence = await self._local.fence(key) if self._local is not None else None
        shared = await self._shared.get(key)
        if shared is None:
            return local, self._shared.name
        if self._local is not None and shared.fresh(now):
            await self._local.set(key, self._localized(shared, now), fence=fence)
        return shared, self._shared.name

    def _localized(self, entry: Entry, now: float) -> Entry:
        fresh_until = min(entry.fresh_until, now + self.ttls.local_fresh_s)
        return Entry(entry.value, fresh_until, max(fresh_until, entry.stale_until), entry.delta_s)

    def _due_early(self, entry: Entry, now: float) -> bool:
        if entry.delta_s <= 0:
            return False
        u = 1.0 - self._rng.random()  # (0, 1]
        return now - entry.delta_s * self.ttls.xfetch_beta * math.log(u) >= entry.fresh_until

    def _refresh_in_background(self, key: str, loader: Loader, held: Entry) -> None:
        if key in self._flights:
            return
        task = self._start_flight(key, loader, held=held)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_consume_exception)

    async def _load(self, key: str, loader: Loader) -> Entry:
        if not self._single_flight:
            return await self._load_and_store(key, loader)
        task = self._flights.get(key) or self._start_flight(key, loader)
        return await asyncio.shield(task)

    def _start_flight(self, key: str, loader: Loader, *, held: Entry | None = None) -> asyncio.Task[Entry]:
        work = self._refresh(key, loader, held) if held is not None else self._load_and_store(key, loader)
        task = asyncio.ensure_future(work)
        self._flights[key] = task
        task.add_done_callback(lambda _: self._flights.pop(key, None))
        return task

    async def _refresh(self, key: str, loader: Loader, held: Entry) -> Entry:
        """Refresh the entry this process holds: another process may already have (its result is
        in the shared tier, fresher than ours), and then the origin is not asked again."""
        if self._shared is not None and self._local is not None:
            fence = await self._local.fence(key)
            shared = await self._shared.get(key)
            now = self._now()
            if shared is not None and shared.fresh(now) and shared.fresh_until > held.fresh_until:
                await self._local.set(key, self._localized(shared, now), fence=fence)
                return shared
        return await self._load_and_store(key, loader)

    async def _load_and_store(self, key: str, loader: Loader) -> Entry:
        fences: list[tuple[Tier, Fence]] = []
        for tier in (self._shared, self._local):
            if tier is not None:
                fences.append((tier, await tier.fence(key)))
        started = self._clock.monotonic()
        self.loads += 1
        try:
            value = await loader()
        except Exception:
            self._hooks.load(self.name, self._clock.monotonic() - started, error=True)
            raise
        delta_s = self._clock.monotonic() - started
        self._hooks.load(self.name, delta_s, error=False)
        now = self._now()
        ttls = self.ttls
        if value is None:
            entry = Entry(None, now + ttls.negative_s, now + ttls.negative_s, delta_s)
        else:
            fresh_until = now + ttls.fresh_s
            stale_until = fresh_until + max(ttls.stale_while_revalidate_s, ttls.stale_if_error_s)
            entry = Entry(value, fresh_until, stale_until, delta_s)
        for tier, fence in fences:
            stored = entry if tier is self._shared else self._localized(entry, now)
            await tier.set(key, stored, fence=fence)
        return entry

    async def invalidate(self, key: str, *, source: str = "write") -> None:
        """Drop `key` here and in the shared tier, and tell the other processes."""
        self._hooks.invalidated(self.name, source)
        if self._local is not None:
            await self._local.invalidate(key)
        if self._shared is not None:
            await self._shared.invalidate(key)
        if self._bus is not None:
            await self._bus.publish(self.name, key)

    async def invalidate_all(self, *, source: str = "purge") -> None:
        self._hooks.invalidated(self.name, source)
        if self._local is not None:
            await self._local.invalidate_all()
        if self._shared is not None:
            await self._shared.invalidate_all()
        if self._bus is not None:
            await self._bus.publish(self.name, None)

    async def _on_broadcast(self, key: str | None) -> None:
        """Another process invalidated `key` (None: everything): drop it from the local tier."""
        if self._local is None:
            return
        self._hooks.invalidated(self.name, "broadcast")
        if key is None:
            await self._local.invalidate_all()
        else:
            await self._local.invalidate(key)


def _consume_exception(task: asyncio.Task[Entry]) -> None:
    if not task.cancelled():
        task.exception()
