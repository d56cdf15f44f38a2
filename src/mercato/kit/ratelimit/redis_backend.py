"""Redis backend: every decision is one EVALSHA of a Lua script, atomic on the server, timed by the server.

- One round trip: the script reads the state, decides and writes it back (no WATCH/MULTI retries, no
  read-modify-write race between API processes).
- One clock: the script calls `TIME`, so processes with skewed clocks still share one timeline.
- Keys vanish: every write sets PEXPIRE to the state's TTL (after which it equals a fresh key).
- Script loaded once: EVALSHA with the locally computed SHA1; on NOSCRIPT (first use, server restart,
  SCRIPT FLUSH) it loads the script and retries once.
- One key per limiter key (`{prefix}{algorithm}:{key}`), so it also works on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from mercato.kit.clock import Clock
from mercato.kit.ratelimit.algorithms import ALGORITHMS, check_cost
from mercato.kit.ratelimit.base import BackendError
from mercato.kit.ratelimit.limit import Decision, Limit
from mercato.kit.ratelimit.metrics import NoMetrics, RateLimitMetrics
from mercato.kit.ratelimit.pipelined import PipelinedRedis, pack_bulk

__all__ = ["DEFAULT_KEY_PREFIX", "LimiterRedis", "RedisLimiter", "load_script_source"]

DEFAULT_KEY_PREFIX = "mercato:rl:"

# Either client runs the scripts: the gateway uses the auto-pipelined connection (ADR 0020), redis-py
# stays supported (and is what tests use to count commands).
LimiterRedis = Redis | PipelinedRedis


def load_script_source(algorithm: str) -> str:
    """The full Lua source for `algorithm`: the shared prelude followed by the algorithm's own script."""
    lua = files("mercato.kit.ratelimit").joinpath("lua")
    return (
        lua.joinpath("common.lua").read_text("utf-8")
        + "\n"
        + lua.joinpath(f"{algorithm}.lua").read_text("utf-8")
    )


# Limits, costs and modes seen by one limiter are few (they come from the policy file); the bound only
# protects memory from a caller that varies `cost` without end.
_MAX_PACKED_TAILS = 1024


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
        # EVALSHA <sha> 1, packed once: the array header is written per call (it counts the arguments).
        self.packed_head = pack_bulk("EVALSHA") + pack_bulk(self.sha) + pack_bulk(1)

    async def run(self, client: LimiterRedis, key: str, args: list[str]) -> Any:
        try:
            return await client.evalsha(self.sha, 1, key, *args)  # type: ignore[misc]
        except NoScriptError:
            # Loaded lazily and only when missing: steady state stays at one round trip per decision.
            await client.script_load(self.source)  # type: ignore[misc]
            return await client.evalsha(self.sha, 1, key, *args)  # type: ignore[misc]

    async def run_packed(self, client: PipelinedRedis, key: str, tail: bytes, count: int) -> Any:
        """The same call with its arguments already packed (`tail`, `count` of them)."""
        payload = b"*%d\r\n%s%s%s" % (count + 4, self.packed_head, pack_bulk(key), tail)
        try:
            return await client.execute_packed(payload)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.execute_packed(payload)


def _float(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


class RedisLimiter:
    """Any algorithm of `ALGORITHMS`, its state in Redis.

    `clock` is a test switch: when given, scripts take `now` from `clock.monotonic()` instead of the
    server's `TIME`, so a test can replay a scripted timeline against Redis. Never set it in production,
    where every process must share the server's clock.
    Errors (connection, timeout, script) are raised as `BackendError`; wrap the limiter in
    `ResilientLimiter` to turn them into a fail-open/closed decision.
    """

    def __init__(
        self,
        algorithm: str,
        *,
        client: LimiterRedis,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        metrics: RateLimitMetrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown rate-limit algorithm {algorithm!r}; choose from {sorted(ALGORITHMS)}")
        self._core = ALGORITHMS[algorithm]
        self._client = client
        self._prefix = key_prefix
        self._metrics: RateLimitMetrics = metrics or NoMetrics()
        self._clock = clock
        self._script = _Script(load_script_source(algorithm))
        self._pipelined = client if isinstance(client, PipelinedRedis) else None
        self._packed_tails: dict[tuple[Limit, int, bool], tuple[bytes, int]] = {}

    @property
    def algorithm(self) -> str:
        return self._core.name

    @property
    def backend(self) -> str:
        return "redis"

    @property
    def client(self) -> LimiterRedis:
        return self._client

    @property
    def call_bound_s(self) -> float | None:
        """How long one decision can take at most when the client bounds its own calls, else None.

        The pipelined connection does (its watchdog fails an overdue reply); redis-py's pool is not
        relied on for it. A script reload after NOSCRIPT (the first call, or after a Redis restart) adds
        two more round trips to that one call.
        """
        return self._client.call_bound_s if isinstance(self._client, PipelinedRedis) else None

    def redis_key(self, key: str) -> str:
        """The Redis key holding `key`'s state."""
        return f"{self._prefix}{self.algorithm}:{key}"

    async def hit(self, key: str, limit: Limit, *, cost: int = 1) -> Decision:
        check_cost(cost, capacity=self._core.capacity(limit))
        decision = self._decision(limit, await self._call(key, limit, cost=cost, commit=True))
        outcome = "allowed" if decision.allowed else "limited"
        self._metrics.decision(algorithm=self.algorithm, backend="redis", outcome=outcome)
        return decision

    async def peek(self, key: str, limit: Limit) -> Decision:
        return self._decision(limit, await self._call(key, limit, cost=1, commit=False))

    async def _call(self, key: str, limit: Limit, *, cost: int, commit: bool) -> list[Any]:
        try:
            if self._pipelined is not None and self._clock is None:
                # The hot path: everything after the key depends only on (limit, cost, commit).
                packed = self._packed_tails.get((limit, cost, commit))
                if packed is None:
                    packed = self._pack_tail(limit, cost=cost, commit=commit)
                redis_key = self.redis_key(key)
                reply: list[Any] = await self._script.run_packed(self._pipelined, redis_key, *packed)
            else:
                args = self._args(limit, cost=cost, commit=commit)
                reply = await self._script.run(self._client, self.redis_key(key), args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendError(f"redis rate limiter failed: {type(exc).__name__}") from exc
        return reply

    def _args(self, limit: Limit, *, cost: int, commit: bool) -> list[str]:
        """The script's ARGV, in the order every `lua/*.lua` reads them."""
        return [
            str(limit.rate),
            repr(float(limit.period_s)),
            str(limit.capacity),
            str(cost),
            "1" if commit else "0",
            "" if self._clock is None else repr(self._clock.monotonic()),
        ]

    def _pack_tail(self, limit: Limit, *, cost: int, commit: bool) -> tuple[bytes, int]:
        args = self._args(limit, cost=cost, commit=commit)
        packed = (b"".join([pack_bulk(arg) for arg in args]), len(args))
        if len(self._packed_tails) >= _MAX_PACKED_TAILS:
            self._packed_tails.clear()
        self._packed_tails[(limit, cost, commit)] = packed
        return packed

    def _decision(self, limit: Limit, reply: list[Any]) -> Decision:
        capacity = self._core.capacity(limit)
        return Decision(bool(reply[0]), capacity, int(reply[1]), _float(reply[2]), _float(reply[3]))
