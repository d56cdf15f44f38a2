"""Edge caching headers for public reads, applied per route by one edge step.

RFC 9111 lets a shared cache (CDN, reverse proxy) store a response only as long as the origin says.
Public catalog reads say ``Cache-Control: public, max-age=N, stale-while-revalidate=M`` (RFC 5861:
serve the stale copy for M more seconds while refetching, so a popular product never stampedes the
origin when it expires) and ``Vary: Accept, Accept-Encoding``: media-type versioning means ``Accept``
selects the representation, and compression selects the bytes, so both belong in the cache key.

Only 200 and 304 responses to GET/HEAD are marked (a 304 repeats the headers the 200 would carry,
RFC 9111 §4.3.4); errors are left alone so a transient 404 or 5xx is never pinned at the edge. A
route that set its own ``Cache-Control`` keeps it; ``Vary`` is merged, never replaced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp

from mercato.config import EdgeCacheSettings
from mercato.gateway.path_memo import remember

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

__all__ = ["CachePolicy", "EdgeCache", "document_cache_headers", "public_catalog_policies"]

_CACHEABLE_STATUS = (200, 304)
DEFAULT_VARY = ("Accept", "Accept-Encoding")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    max_age_s: int
    stale_while_revalidate_s: int
    vary: tuple[str, ...] = DEFAULT_VARY

    @property
    def cache_control(self) -> str:
        return f"public, max-age={self.max_age_s}, stale-while-revalidate={self.stale_while_revalidate_s}"


Policies = Sequence[tuple[re.Pattern[str], CachePolicy]]


def public_catalog_policies(settings: EdgeCacheSettings) -> list[tuple[re.Pattern[str], CachePolicy]]:
    """`/v{N}/products` (lists change often: short) and `/v{N}/products/{id}` (longer)."""
    return [
        (
            re.compile(r"^/v\d+/products$"),
            CachePolicy(settings.list_max_age_s, settings.list_stale_while_revalidate_s),
        ),
        (
            re.compile(r"^/v\d+/products/[^/]+$"),
            CachePolicy(settings.product_max_age_s, settings.product_stale_while_revalidate_s),
        ),
    ]


def _policy_for(policies: Policies, path: str) -> CachePolicy | None:
    for pattern, policy in policies:
        if pattern.match(path):
            return policy
    return None


def merge_vary(existing: str | None, extra: Sequence[str]) -> str:
    values = [v.strip() for v in (existing or "").split(",") if v.strip()]
    seen = {v.lower() for v in values}
    values.extend(v for v in extra if v.lower() not in seen)
    return ", ".join(values)


_READS = frozenset({"GET", "HEAD"})


class EdgeCache:
    """Edge step: `Cache-Control` and `Vary` on a matching public read's 200 or 304."""

    def __init__(self, *, policies: Policies) -> None:
        # Kept by reference: the runtime configuration replaces the list's items (ADR 0045).
        self.policies = policies
        self._markers: dict[CachePolicy, _Marker] = {}
        # The marker of each path (None: no policy), valid while the policies are the ones seen.
        self._seen = list(policies)
        self._by_path: dict[str, _Marker | None] = {}

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        if ex.method not in _READS:
            return None
        if self.policies != self._seen:
            # Replaced by the runtime configuration: what each path matched may have changed.
            self._seen = list(self.policies)
            self._by_path.clear()
        path = ex.path
        try:
            marker = self._by_path[path]
        except KeyError:
            marker = remember(self._by_path, path, path, self._marker_for(path))
        if marker is not None:
            ex.on_start(marker)
        return None

    def _marker_for(self, path: str) -> _Marker | None:
        policy = _policy_for(self.policies, path)
        if policy is None:
            return None
        marker = self._markers.get(policy)
        if marker is None:
            if len(self._markers) >= 64:
                self._markers.clear()  # policies replaced by the runtime configuration
            marker = self._markers[policy] = _Marker(policy)
        return marker


class _Marker:
    """One policy's header rewrite, its values encoded once (the merged `Vary` memoised by the
    response's own, of which a handful exist)."""

    __slots__ = ("cache_control", "done", "policy", "vary")

    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self.cache_control = (b"cache-control", policy.cache_control.encode("latin-1"))
        self.vary: dict[bytes | None, tuple[bytes, bytes]] = {}
        self.done: dict[tuple[tuple[bytes, bytes], ...], list[tuple[bytes, bytes]]] = {}

    def _merged(self, vary: bytes | None) -> tuple[bytes, bytes]:
        found = self.vary.get(vary)
        if found is None:
            if len(self.vary) >= 64:
                self.vary.clear()
            merged = merge_vary(vary.decode("latin-1") if vary else None, self.policy.vary)
            found = self.vary[vary] = (b"vary", merged.encode("latin-1"))
        return found

    def __call__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status not in _CACHEABLE_STATUS:
            return
        # Results by the headers given: a prepared answer hands the same ones every time.
        given = tuple(headers)
        result = self.done.get(given)
        if result is None:
            self._mark(headers)
            if len(self.done) >= 1024:
                self.done.clear()
            self.done[given] = list(headers)
        else:
            headers[:] = result

    def _mark(self, headers: list[tuple[bytes, bytes]]) -> None:
        vary: bytes | None = None
        has_cache_control = False
        kept = []
        for key, value in headers:
            lower = key.lower()
            if lower == b"vary":
                if vary is None:
                    vary = value
                continue
            if lower == b"cache-control":
                has_cache_control = True
            kept.append((key, value))
        kept.append(self._merged(vary))
        if not has_cache_control:
            kept.append(self.cache_control)
        headers[:] = kept


def document_cache_headers(schema: dict[str, Any], policies: Policies) -> None:
    """Add `Cache-Control` and `Vary` to the documented 200 response of each matching GET route."""
    for path, item in schema.get("paths", {}).items():
        policy = _policy_for(policies, path)
        operation = item.get("get")
        if policy is None or operation is None:
            continue
        ok = operation.get("responses", {}).get("200")
        if ok is None:
            continue
        headers = ok.setdefault("headers", {})
        headers.setdefault(
            "Cache-Control",
            {
                "schema": {"type": "string"},
                "description": f"Shared caches may store it: `{policy.cache_control}`",
            },
        )
        headers.setdefault(
            "Vary", {"schema": {"type": "string"}, "description": "Includes `" + ", ".join(policy.vary) + "`"}
        )
