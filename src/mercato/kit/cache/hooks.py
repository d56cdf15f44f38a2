"""Metric hooks of the cache: a Protocol, and the Prometheus implementation (`mercato_cache_*`)."""

from __future__ import annotations

from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mercato.kit.observability.loop_metrics import LoopCounter

__all__ = ["CacheHooks", "Lookup", "NoCacheHooks", "PrometheusCacheHooks"]

# hit: fresh value from the named tier; negative: a cached "not found"; miss: nothing servable.
Lookup = Literal["hit", "negative", "miss"]


class CacheHooks(Protocol):
    def lookup(self, cache: str, tier: str, result: Lookup) -> None: ...

    def load(self, cache: str, seconds: float, *, error: bool) -> None: ...

    def stale_served(self, cache: str, reason: Literal["revalidate", "error"]) -> None: ...

    def invalidated(self, cache: str, source: str) -> None: ...

    def evicted(self, tier: str, count: int) -> None: ...

    def size(self, tier: str, entries: int, nbytes: int) -> None: ...


class NoCacheHooks:
    def lookup(self, cache: str, tier: str, result: Lookup) -> None:
        pass

    def load(self, cache: str, seconds: float, *, error: bool) -> None:
        pass

    def stale_served(self, cache: str, reason: Literal["revalidate", "error"]) -> None:
        pass

    def invalidated(self, cache: str, source: str) -> None:
        pass

    def evicted(self, tier: str, count: int) -> None:
        pass

    def size(self, tier: str, entries: int, nbytes: int) -> None:
        pass


class PrometheusCacheHooks:
    def __init__(self, registry: CollectorRegistry) -> None:
        # Recorded into without a lock (`record`): lookups run on the event loop's thread.
        self._lookups = LoopCounter(
            "mercato_cache_requests",
            "Cache lookups by cache, tier and result (hit, negative, miss)",
            ["cache", "tier", "result"],
            registry=registry,
        )
        self._load = Histogram(
            "mercato_cache_load_seconds",
            "Time to load a value from the origin on a miss or refresh",
            ["cache", "outcome"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self._stale = Counter(
            "mercato_cache_stale_served",
            "Stale values served, by reason (revalidate: while refreshing; error: the origin failed)",
            ["cache", "reason"],
            registry=registry,
        )
        self._invalidations = Counter(
            "mercato_cache_invalidations",
            "Keys invalidated, by source (write, event, broadcast, purge)",
            ["cache", "source"],
            registry=registry,
        )
        self._evictions = Counter(
            "mercato_cache_evictions", "Entries evicted for room", ["tier"], registry=registry
        )
        self._entries = Gauge("mercato_cache_entries", "Entries held", ["tier"], registry=registry)
        self._bytes = Gauge("mercato_cache_bytes", "Bytes held", ["tier"], registry=registry)
        # The lookup counter's children by label values: resolving `labels()` costs more than `inc()`.
        self._lookup_children: dict[tuple[str, str, str], LoopCounter] = {}

    def lookup(self, cache: str, tier: str, result: Lookup) -> None:
        key = (cache, tier, result)
        child = self._lookup_children.get(key)
        if child is None:
            child = self._lookup_children[key] = self._lookups.labels(cache, tier, result)
        child.record()

    def load(self, cache: str, seconds: float, *, error: bool) -> None:
        self._load.labels(cache, "error" if error else "ok").observe(seconds)

    def stale_served(self, cache: str, reason: Literal["revalidate", "error"]) -> None:
        self._stale.labels(cache, reason).inc()

    def invalidated(self, cache: str, source: str) -> None:
        self._invalidations.labels(cache, source).inc()

    def evicted(self, tier: str, count: int) -> None:
        self._evictions.labels(tier).inc(count)

    def size(self, tier: str, entries: int, nbytes: int) -> None:
        self._entries.labels(tier).set(entries)
        self._bytes.labels(tier).set(nbytes)
