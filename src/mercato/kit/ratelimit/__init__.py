"""Rate limiting: five algorithms, one interface, in-process or Redis state, fail-open/closed by policy.

    limiter = build_limiter("token_bucket", "redis", redis_url=..., fail_open=True)
    decision = await limiter.hit("login:ip:203.0.113.7", Limit(rate=5, period_s=60, burst=10))
    if not decision.allowed: respond 429 with decision.headers()

Algorithms: `token_bucket`, `leaky_bucket` (GCRA meter), `fixed_window`,
`sliding_window` (counter approximation), `sliding_log` (exact). Backends: `memory`, `redis`.
"""

from mercato.kit.ratelimit.algorithms import ALGORITHMS
from mercato.kit.ratelimit.base import BackendError, RateLimiter
from mercato.kit.ratelimit.factory import (
    ALGORITHM_NAMES,
    BACKEND_NAMES,
    build_limiter,
    pipelined_client_for_limiter,
    redis_client_for_limiter,
)
from mercato.kit.ratelimit.limit import Decision, Limit
from mercato.kit.ratelimit.memory import MemoryLimiter
from mercato.kit.ratelimit.metrics import NoMetrics, PrometheusRateLimitMetrics, RateLimitMetrics
from mercato.kit.ratelimit.pipelined import PipelinedRedis
from mercato.kit.ratelimit.redis_backend import DEFAULT_KEY_PREFIX, RedisLimiter
from mercato.kit.ratelimit.resilient import BreakerState, ConsecutiveFailureBreaker, ResilientLimiter

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_NAMES",
    "BACKEND_NAMES",
    "DEFAULT_KEY_PREFIX",
    "BackendError",
    "BreakerState",
    "ConsecutiveFailureBreaker",
    "Decision",
    "Limit",
    "MemoryLimiter",
    "NoMetrics",
    "PipelinedRedis",
    "PrometheusRateLimitMetrics",
    "RateLimitMetrics",
    "RateLimiter",
    "RedisLimiter",
    "ResilientLimiter",
    "build_limiter",
    "pipelined_client_for_limiter",
    "redis_client_for_limiter",
]
