"""Prometheus metrics: RED per route template, and database pool saturation."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mercato.kit.observability.loop_metrics import LoopCounter, LoopHistogram

# Latency buckets in seconds: dense where an API lives (1 ms to 1 s), sparse beyond.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    """Request count by status and latency histogram, labelled by route template, never raw path.
    Their children take `record` (unlocked) from the event loop's thread: the edge's per-request path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = LoopCounter(
            "mercato_http_requests_total",
            "HTTP requests handled, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = LoopHistogram(
            "mercato_http_request_duration_seconds",
            "HTTP request latency from first byte in to last byte out.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, *, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class _PoolCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, int]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._status()
        gauge = GaugeMetricFamily(
            "mercato_db_pool_connections",
            "Database pool connections by state (size, checked_out, idle, overflow).",
            labels=["state"],
        )
        for state, value in status.items():
            gauge.add_metric([state], float(value))
        yield gauge


def register_pool_gauges(registry: CollectorRegistry, status: Callable[[], dict[str, int]]) -> None:
    registry.register(_PoolCollector(status))


def register_process_collectors(registry: CollectorRegistry) -> None:
    """CPU seconds, resident and virtual memory, open fds, start time (`process_*`), the garbage
    collector (`python_gc_*`) and the interpreter (`python_info`): the saturation half of every
    process's /metrics (API, worker, simulators)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
