"""Load shedding at the edge: classify each request, take a concurrency slot or answer 503 at once.

Pure ASGI and placed just inside `RequestContextMiddleware`, so a refusal still carries the request
id and is counted in the RED metrics, but costs no routing, no dependency resolution and no database
work: a shed request is answered in well under a millisecond of server time. Classes (ADR 0012):

- critical (shed last): probes and metrics, checkout, sign-in/refresh;
- sheddable (shed first): catalog browsing, media, documentation;
- normal: everything else (cart, orders, admin).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from mercato.config import BackpressureSettings
from mercato.kit.backpressure import (
    BackpressureHook,
    ClassLimits,
    ConcurrencyLimiter,
    Overloaded,
    Priority,
)
from mercato.kit.clock import Clock
from mercato.kit.observability import request_id_var
from mercato.kit.web.problems import problem_response

__all__ = ["DEFAULT_RULES", "SheddingMiddleware", "build_limiter", "classify"]

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


class SheddingMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: ConcurrencyLimiter,
        classifier: Callable[[str, str], Priority] = classify,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.classifier = classifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _LONG_LIVED.match(scope["path"]):
            # A live stream holds its request for minutes: it must not hold a concurrency slot.
            await self.app(scope, receive, send)
            return
        priority = self.classifier(scope["method"], scope["path"])
        try:
            await self.limiter.acquire(priority)
        except Overloaded as exc:
            response = problem_response(
                status=503,
                slug="overloaded",
                title="Server overloaded",
                detail=f"shedding {priority.label} requests; retry after {exc.retry_after_s} s",
                instance=scope["path"],
                request_id=request_id_var.get(),
                headers={"Retry-After": str(exc.retry_after_s)},
            )
            await response(scope, receive, send)
            return
        try:
            # Held until the response is fully sent: a streaming body still occupies the worker.
            await self.app(scope, receive, send)
        finally:
            self.limiter.release()
