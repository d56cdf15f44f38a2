"""The API process's part of safe releases: the runtime configuration applied to the edge (rate-limit
policies, shedding limits, Cache-Control lifetimes; ADR 0045), and a lab's bad build.

`FaultInjection` (an edge step) turns a fraction of `/v1` answers into 500s when
`MERCATO_RELEASE_INJECT_ERROR_RATIO` is set (dev/test only, refused elsewhere by the settings):
`mercato lab canary` starts its canary group with it to prove the automatic rollback.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp

from mercato.gateway.caching import CachePolicy, public_catalog_policies
from mercato.gateway.ratelimit import RateLimiting
from mercato.gateway.shedding import build_limiter
from mercato.kit.backpressure import ConcurrencyLimiter
from mercato.kit.web.problems import problem_response
from mercato.runtime_appliers import Commit
from mercato.runtime_config import RuntimeConfig

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

__all__ = ["FaultInjection", "edge_preparers"]


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


class FaultInjection:
    """A bad build (edge step): `ratio` of `/v1/` requests answer 500 (problem+json) without being handled."""

    def __init__(self, *, ratio: float, rng: random.Random | None = None) -> None:
        self.ratio = ratio
        self._rng = rng or random.Random()

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        if ex.path.startswith("/v1/") and self._rng.random() < self.ratio:
            return problem_response(
                status=500,
                slug="internal",
                title="Internal Server Error",
                detail="injected fault (release lab)",
                instance=ex.path,
                request_id=ex.request_id,
            )
        return None
