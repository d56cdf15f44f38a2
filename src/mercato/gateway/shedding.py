"""Load shedding at the edge: classify each request, take a concurrency slot or answer 503 at once.

An edge step (ADR 0054) run first after the request context, so a refusal still carries the request
id and is counted in the RED metrics, but costs no routing, no dependency resolution and no database
work: a shed request is answered in well under a millisecond of server time. Classes (ADR 0012):

- critical (shed last): probes and metrics, checkout, sign-in/refresh;
- sheddable (shed first): catalog browsing, media, documentation;
- normal: everything else (cart, orders, admin).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from starlette.types import ASGIApp

from mercato.config import BackpressureSettings
from mercato.gateway.path_memo import remember
from mercato.kit.backpressure import (
    BackpressureHook,
    ClassLimits,
    ConcurrencyLimiter,
    Overloaded,
    Priority,
)
from mercato.kit.clock import Clock
from mercato.kit.web.problems import problem_response

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

__all__ = ["DEFAULT_RULES", "Shedding", "build_limiter", "classify"]

# (methods or None for any, path pattern, class); the first match wins, no match is NORMAL.
Rule = tuple[frozenset[str] | None, re.Pattern[str], Priority]
_READS = frozenset({"GET", "HEAD"})
DEFAULT_RULES: tuple[Rule, ...] = (
    (None, re.compile(r"^/(healthz|readyz|startupz|metrics)$"), Priority.CRITICAL),
    (None, re.compile(r"^/v\d+/checkout(/|$)"), Priority.CRITICAL),
    (None, re.compile(r"^/v\d+/auth/"), Priority.CRITICAL),
    (_READS, re.compile(r"^/v\d+/products(/|$)"), Priority.SHEDDABLE),
    (_READS, re.compile(r"^/media/"), Priority.SHEDDABLE),
    (_READS, re.compile(r"^/(docs|openapi\.json|problems)(/|$)"), Priority.SHEDDABLE),
)


# Server-Sent Events streams (real time, ADR 0029).
_LONG_LIVED = re.compile(r"^/v\d+/orders/[^/]+/events$")


def classify(method: str, path: str, rules: Sequence[Rule] = DEFAULT_RULES) -> Priority:
    for methods, pattern, priority in rules:
        if (methods is None or method in methods) and pattern.match(path):
            return priority
    return Priority.NORMAL


def build_limiter(
    settings: BackpressureSettings, *, clock: Clock | None = None, hook: BackpressureHook | None = None
) -> ConcurrencyLimiter:
    timeout_s = settings.queue_timeout_ms / 1000
    return ConcurrencyLimiter(
        max_inflight=settings.max_inflight,
        classes={
            Priority.CRITICAL: ClassLimits(
                share=1.0,
                queue_size=settings.queue_size * 2,
                queue_timeout_s=settings.critical_queue_timeout_ms / 1000,
            ),
            Priority.NORMAL: ClassLimits(
                share=settings.normal_share, queue_size=settings.queue_size, queue_timeout_s=timeout_s
            ),
            Priority.SHEDDABLE: ClassLimits(
                share=settings.sheddable_share, queue_size=settings.queue_size, queue_timeout_s=timeout_s
            ),
        },
        retry_after_s=settings.retry_after_s,
        clock=clock,
        hook=hook,
    )


class Shedding:
    """Edge step: take a concurrency slot for the request's class, or answer 503 at once. The slot is
    released when the edge finishes the request (a streaming body still occupies the worker)."""

    def __init__(
        self, *, limiter: ConcurrencyLimiter, classifier: Callable[[str, str], Priority] = classify
    ) -> None:
        self.limiter = limiter
        self.classifier = classifier
        # A class depends only on the method and path: decided once per pair, not by up to seven
        # regular expressions on every request.
        self._classes: dict[tuple[str, str], Priority | None] = {}

    def _class_of(self, method: str, path: str) -> Priority | None:
        """The request's class, or None for a request that takes no slot."""
        key = (method, path)
        try:
            return self._classes[key]
        except KeyError:
            pass
        # A live stream holds its request for minutes: it must not hold a concurrency slot.
        found = None if _LONG_LIVED.match(path) else self.classifier(method, path)
        return remember(self._classes, key, path, found)

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        priority = self._class_of(ex.method, ex.path)
        if priority is None:
            return None
        try:
            await self.limiter.acquire(priority)
        except Overloaded as exc:
            return problem_response(
                status=503,
                slug="overloaded",
                title="Server overloaded",
                detail=f"shedding {priority.label} requests; retry after {exc.retry_after_s} s",
                instance=ex.path,
                request_id=ex.request_id,
                headers={"Retry-After": str(exc.retry_after_s)},
            )
        ex.defer(self.limiter.release)
        return None
