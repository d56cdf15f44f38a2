"""How stale a response is, told to the client: the `Mercato-Staleness` header's source.

RFC 9111 §4.2 calls a response *stale* once its age exceeds its freshness lifetime, and its
*staleness* is by how much. When the cache serves an entry past its freshness (stale-while-
revalidate, or stale-if-error because the origin, the primary database, failed or was unreachable),
it records that staleness in the request's scope; the edge turns the largest one into
`Mercato-Staleness: <whole seconds, rounded up>` (docs/consistency.md). No scope open (a worker, a
test): nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["StalenessScope", "open_staleness_scope", "record_staleness", "staleness_scope"]


@dataclass
class StalenessScope:
    staleness_s: float | None = None
    reason: str | None = None

    def served(self, staleness_s: float, reason: str) -> None:
        if self.staleness_s is None or staleness_s > self.staleness_s:
            self.staleness_s = max(0.0, staleness_s)
            self.reason = reason


_scope: ContextVar[StalenessScope | None] = ContextVar("mercato_staleness_scope", default=None)


def open_staleness_scope() -> tuple[StalenessScope, Callable[[], None]]:
    """`staleness_scope` without a `with` block: the scope and the function that closes it (the edge
    opens it in one step and closes it when the request ends, without a generator frame per request)."""
    scope = StalenessScope()
    reset = _scope.set(scope)
    return scope, lambda: _scope.reset(reset)


@contextmanager
def staleness_scope() -> Iterator[StalenessScope]:
    scope = StalenessScope()
    reset = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(reset)


def record_staleness(staleness_s: float, reason: str) -> None:
    """`reason`: `revalidate` (served while refreshing) or `error` (the origin failed)."""
    scope = _scope.get()
    if scope is not None:
        scope.served(staleness_s, reason)
