"""Backpressure for a request-serving process: a priority-aware concurrency limiter that fails fast.

    limiter = ConcurrencyLimiter(max_inflight=64)
    try:
        await limiter.acquire(Priority.SHEDDABLE)
    except Overloaded as exc:
        answer 503 with Retry-After: exc.retry_after_s
    else:
        try: serve ... finally: limiter.release()

Sheddable work is refused first, critical work last (see `limiter` for the admission rule).
"""

from mercato.kit.backpressure.limiter import (
    DEFAULT_CLASSES,
    ClassLimits,
    ConcurrencyLimiter,
    Overloaded,
    Priority,
)
from mercato.kit.backpressure.metrics import (
    BackpressureHook,
    NoBackpressureMetrics,
    PrometheusBackpressureMetrics,
)

__all__ = [
    "DEFAULT_CLASSES",
    "BackpressureHook",
    "ClassLimits",
    "ConcurrencyLimiter",
    "NoBackpressureMetrics",
    "Overloaded",
    "Priority",
    "PrometheusBackpressureMetrics",
]
