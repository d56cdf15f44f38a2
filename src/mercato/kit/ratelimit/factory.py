"""The one place that chooses an algorithm and a backend, from configuration values."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mercato.kit.clock import Clock
from mercato.kit.ratelimit.algorithms import ALGORITHMS
from mercato.kit.ratelimit.base import RateLimiter
from mercato.kit.ratelimit.memory import MemoryLimiter
from mercato.kit.ratelimit.metrics import RateLimitMetrics
from mercato.kit.ratelimit.pipelined import PipelinedRedis
from mercato.kit.ratelimit.redis_backend import DEFAULT_KEY_PREFIX, LimiterRedis, RedisLimiter
from mercato.kit.ratelimit.resilient import ResilientLimiter

__all__ = [
    "ALGORITHM_NAMES",
    "BACKEND_NAMES",
    "build_limiter",
    "pipelined_client_for_limiter",
    "redis_client_for_limiter",
]

ALGORITHM_NAMES: tuple[str, ...] = tuple(ALGORITHMS)
BACKEND_NAMES: tuple[str, ...] = ("memory", "redis")


def redis_client_for_limiter(redis_url: str, *, socket_timeout_s: float = 0.1) -> Redis:
    """A client tuned for a limiter: short connect/read timeouts and no client-side retries.

    A limiter sits on every request's path, so a slow Redis must cost at most `socket_timeout_s`; retries
    are left to the breaker in `ResilientLimiter` (redis-py's default retries with backoff would multiply the
    wait). No connection is made until the first command.
    """
    return Redis.from_url(
        redis_url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def pipelined_client_for_limiter(redis_url: str, *, socket_timeout_s: float = 0.1) -> PipelinedRedis:
    """The limiter's default client: one auto-pipelined connection (ADR 0020), same timeouts, no retries."""
    return PipelinedRedis(redis_url, socket_timeout_s=socket_timeout_s)


def build_limiter(
    algorithm: str,
    backend: str,
    *,
    redis_url: str = "redis://127.0.0.1:6379/0",
    redis_client: LimiterRedis | None = None,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    fail_open: bool = True,
    socket_timeout_s: float = 0.1,
    timeout_s: float = 0.25,
    failure_threshold: int = 5,
    reset_timeout_s: float = 5.0,
    max_keys: int = 100_000,
    clock: Clock | None = None,
    metrics: RateLimitMetrics | None = None,
) -> RateLimiter:
    """`algorithm` is one of `ALGORITHM_NAMES`, `backend` one of `BACKEND_NAMES`.

    - memory: the pure cores in this process (`max_keys` bounds its table; `clock` is its time source).
    - redis: one Lua EVALSHA per decision on `redis_client` (or an auto-pipelined connection to `redis_url`
      with `socket_timeout_s`), wrapped in `ResilientLimiter` (`fail_open`, `timeout_s`, `failure_threshold`,
      `reset_timeout_s`; `clock` drives its breaker, while decisions use the Redis server's time).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown rate-limit algorithm {algorithm!r}; choose from {ALGORITHM_NAMES}")
    if backend == "memory":
        return MemoryLimiter(ALGORITHMS[algorithm], clock=clock, max_keys=max_keys, metrics=metrics)
    if backend == "redis":
        client = redis_client or pipelined_client_for_limiter(redis_url, socket_timeout_s=socket_timeout_s)
        inner = RedisLimiter(algorithm, client=client, key_prefix=key_prefix, metrics=metrics)
        return ResilientLimiter(
            inner,
            fail_open=fail_open,
            timeout_s=timeout_s,
            failure_threshold=failure_threshold,
            reset_timeout_s=reset_timeout_s,
            clock=clock,
            metrics=metrics,
        )
    raise ValueError(f"unknown rate-limit backend {backend!r}; choose from {BACKEND_NAMES}")
