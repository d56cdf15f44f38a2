"""An application cache: cache-aside over an in-process tier (bounded by bytes; LRU or W-TinyLFU)
and a Redis tier, with single-flight, XFetch early refresh, stale-while-revalidate, stale-if-error,
negative caching, fenced stores against the delete-then-load race, and a pub/sub bus that carries
invalidations to every process. No shop knowledge. See docs/decisions/0034 and 0035.
"""

from mercato.kit.cache.bus import InvalidationBus, RedisInvalidationBus
from mercato.kit.cache.cache import Cache, CacheTtls, Loader
from mercato.kit.cache.entry import Entry, Fence
from mercato.kit.cache.hooks import CacheHooks, NoCacheHooks, PrometheusCacheHooks
from mercato.kit.cache.policies import ByteStore, CountMinSketch, LruStore, TinyLfuStore
from mercato.kit.cache.staleness import (
    StalenessScope,
    open_staleness_scope,
    record_staleness,
    staleness_scope,
)
from mercato.kit.cache.tiers import MemoryTier, RedisTier, Tier

__all__ = [
    "ByteStore",
    "Cache",
    "CacheHooks",
    "CacheTtls",
    "CountMinSketch",
    "Entry",
    "Fence",
    "InvalidationBus",
    "Loader",
    "LruStore",
    "MemoryTier",
    "NoCacheHooks",
    "PrometheusCacheHooks",
    "RedisInvalidationBus",
    "RedisTier",
    "StalenessScope",
    "Tier",
    "TinyLfuStore",
    "open_staleness_scope",
    "record_staleness",
    "staleness_scope",
]
