"""Instrumentation hook for the concurrency limiter, and its Prometheus implementation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from mercato.kit.observability.loop_metrics import LoopHistogram

if TYPE_CHECKING:
    from mercato.kit.backpressure.limiter import Priority

__all__ = ["BackpressureHook", "NoBackpressureMetrics", "PrometheusBackpressureMetrics"]

# Queue timeouts are milliseconds (critical: up to ~100 ms): buckets resolve that range, not seconds.
_WAIT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256)


class BackpressureHook(Protocol):
    """Called on the request path: must be cheap and must not raise."""

    def admitted(self, priority: Priority, *, queue_wait_s: float) -> None:
        """A request got a slot after waiting `queue_wait_s` (0 when admitted at once)."""
        ...

    def shed(self, priority: Priority, *, reason: str) -> None:
        """A request was refused: `reason` is `queue_full` or `queue_timeout`."""
        ...

    def inflight_changed(self, inflight: int) -> None:
        """The number of requests holding a slot changed."""
        ...


class NoBackpressureMetrics:
    def admitted(self, priority: Priority, *, queue_wait_s: float) -> None:
        return None

    def shed(self, priority: Priority, *, reason: str) -> None:
        return None

    def inflight_changed(self, inflight: int) -> None:
        return None


class PrometheusBackpressureMetrics:
    """`mercato_backpressure_inflight`, `mercato_backpressure_shed_total{class,reason}` and
    `mercato_backpressure_queue_wait_seconds{class}` (admitted requests only)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Read at scrape time: the limiter changes it twice per request, and a locked `set` each
        # time costs more than the rest of the shedding step's bookkeeping.
        self._inflight_now = 0
        self._inflight = Gauge(
            "mercato_backpressure_inflight", "Requests holding a concurrency slot", registry=registry
        )
        self._inflight.set_function(lambda: self._inflight_now)
        self._shed = Counter(
            "mercato_backpressure_shed",
            "Requests refused with 503 by the load shedder",
            ["class", "reason"],
            registry=registry,
        )
        # Recorded into without a lock (`record`): the limiter admits on the event loop's thread.
        self._wait = LoopHistogram(
            "mercato_backpressure_queue_wait_seconds",
            "Time admitted requests waited for a slot",
            ["class"],
            buckets=_WAIT_BUCKETS_S,
            registry=registry,
        )

        # One child per class, resolved once: `admitted` runs on every request. (Imported here: the
        # limiter module imports this one.)
        from mercato.kit.backpressure.limiter import Priority

        self._wait_by_class = {priority: self._wait.labels(priority.label) for priority in Priority}

    def admitted(self, priority: Priority, *, queue_wait_s: float) -> None:
        self._wait_by_class[priority].record(queue_wait_s)

    def shed(self, priority: Priority, *, reason: str) -> None:
        self._shed.labels(priority.label, reason).inc()

    def inflight_changed(self, inflight: int) -> None:
        self._inflight_now = inflight
