"""The one interface every limiter implements, whatever the algorithm and wherever the state lives."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from mercato.kit.ratelimit.limit import Decision, Limit

__all__ = ["BackendError", "RateLimiter"]


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
