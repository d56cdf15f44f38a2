"""gateway/caching.py's edge step: the policy of each path is remembered, and forgotten as soon as the
runtime configuration replaces the policies in place (ADR 0045), whatever a path matched before."""

from __future__ import annotations

import re

from mercato.gateway.caching import CachePolicy, EdgeCache
from mercato.gateway.edge import Exchange


async def _no_body() -> dict[str, object]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _cache_control(step: EdgeCache, path: str, method: str = "GET") -> bytes | None:
    """The `Cache-Control` the step puts on a 200 for `path` (None: the step leaves it unmarked)."""
    ex = Exchange({"type": "http", "method": method, "path": path, "headers": []}, _no_body, "rid")
    assert await step(ex) is None
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    for hook in ex.hooks:
        hook(200, headers)
    return dict(headers).get(b"cache-control")


async def test_remembered_paths_follow_policies_replaced_in_place() -> None:
    policies = [(re.compile(r"^/a$"), CachePolicy(10, 20))]
    step = EdgeCache(policies=policies)
    for _ in range(2):
        assert await _cache_control(step, "/a") == b"public, max-age=10, stale-while-revalidate=20"
        assert await _cache_control(step, "/b") is None
        assert await _cache_control(step, "/a", method="POST") is None
    policies[:] = [(re.compile(r"^/b$"), CachePolicy(5, 6)), (re.compile(r"^/a$"), CachePolicy(30, 40))]
    assert await _cache_control(step, "/a") == b"public, max-age=30, stale-while-revalidate=40"
    assert await _cache_control(step, "/b") == b"public, max-age=5, stale-while-revalidate=6"
    policies[:] = []
    assert await _cache_control(step, "/a") is None
