"""The API process's part of safe releases: the runtime configuration applied to the edge (rate-limit
policies, shedding limits, Cache-Control lifetimes; ADR 0045), and a lab's bad build.

`FaultInjectionMiddleware` turns a fraction of `/v1` answers into 500s when
`MERCATO_RELEASE_INJECT_ERROR_RATIO` is set (dev/test only, refused elsewhere by the settings):
`mercato lab canary` starts its canary group with it to prove the automatic rollback.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from mercato.gateway.caching import CachePolicy, public_catalog_policies
from mercato.gateway.ratelimit import RateLimiting
from mercato.gateway.shedding import build_limiter
from mercato.kit.backpressure import ConcurrencyLimiter
from mercato.kit.observability import request_id_var
from mercato.kit.web.problems import problem_response
from mercato.runtime_appliers import Commit
from mercato.runtime_config import RuntimeConfig

__all__ = ["FaultInjectionMiddleware", "edge_preparers"]


def edge_preparers(
    *,
    rate_limiting: RateLimiting | None,
    limiter: ConcurrencyLimiter | None,
    cache_policies: list[tuple[object, CachePolicy]],
) -> list[Callable[[RuntimeConfig], Commit]]:
    out: list[Callable[[RuntimeConfig], Commit]] = []
    if rate_limiting is not None:
        store = rate_limiting.enforcer.store

        def prepare_policies(config: RuntimeConfig) -> Commit:
            policies = config.ratelimit_policies
            return lambda: store.override(policies)

        out.append(prepare_policies)
    if limiter is not None:
        live = limiter

        def prepare_shedding(config: RuntimeConfig) -> Commit:
            fresh = build_limiter(config.backpressure)
            return lambda: live.adopt_limits(fresh)

        out.append(prepare_shedding)

    def prepare_edge_cache(config: RuntimeConfig) -> Commit:
        policies = public_catalog_policies(config.edge_cache)

        def commit() -> None:
            cache_policies[:] = policies

        return commit

    out.append(prepare_edge_cache)
    return out


class FaultInjectionMiddleware:
    """A bad build: `ratio` of `/v1/` requests answer 500 (problem+json) without being handled."""

    def __init__(self, app: ASGIApp, *, ratio: float, rng: random.Random | None = None) -> None:
        self.app = app
        self.ratio = ratio
        self._rng = rng or random.Random()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and self._rng.random() < self.ratio:
            response = problem_response(
                status=500,
                slug="internal",
                title="Internal Server Error",
                detail="injected fault (release lab)",
                instance=scope["path"],
                request_id=request_id_var.get(),
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
