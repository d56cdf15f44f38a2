"""The one interface every limiter implements, whatever the algorithm and wherever the state lives."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from mercato.kit.ratelimit.limit import Decision, Limit, Reservation

__all__ = ["BackendError", "RateLimiter", "Shaper"]


class BackendError(Exception):
    """The limiter's store could not answer (connection refused, timeout, script error)."""


@runtime_checkable
class RateLimiter(Protocol):
    """`hit` consumes `cost` units of `key`'s quota under `limit` if available; `peek` only looks.

    The key names the caller *and* the policy (e.g. `"orders:create:user:42"`): one key must always be used
    with the same `Limit` and algorithm, or the stored state is read under the wrong rules.
    """

    @property
    def algorithm(self) -> str: ...

    @property
    def backend(self) -> str: ...

    async def hit(self, key: str, limit: Limit, *, cost: int = 1) -> Decision: ...

    async def peek(self, key: str, limit: Limit) -> Decision:
        """Would a hit of 1 be admitted now? `remaining`/`reset_after_s` describe the state as stored."""
        ...


@runtime_checkable
class Shaper(RateLimiter, Protocol):
    """A leaky bucket that queues: work is released at the drained rate instead of being refused.

    Usage: `r = await shaper.acquire(key, limit, max_wait_s=2.0)`; if `r.granted`,
    `await asyncio.sleep(r.wait_s)` and then do the work; otherwise shed it (429/503 with `Retry-After`).
    The limiter never sleeps itself, so a cancelled caller holds no connection or lock while it waits (its
    slot stays reserved; that is the price of not needing a release call).
    """

    async def acquire(self, key: str, limit: Limit, *, max_wait_s: float, cost: int = 1) -> Reservation: ...
