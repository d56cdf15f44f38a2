"""Prometheus hooks for the client-side balancer: per-endpoint load, outcomes and ejections (guide §30
metrics: "per-endpoint load, error rates, ejections, request distribution")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from mercato.kit.balancing.outlier import Outcome

__all__ = ["PrometheusBalancerHooks"]


class PrometheusBalancerHooks:
    """`mercato_balancer_*`, labelled by `pool` (the dependency: `psp`) and `endpoint`. One instance
    per registry; `for_pool` gives each balancer its labelled view."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mercato_balancer_requests_total",
            "Calls through a client-side balancer, by endpoint and outcome.",
            ["pool", "endpoint", "outcome"],
            registry=registry,
        )
        self.ejections = Counter(
            "mercato_balancer_ejections_total",
            "Outlier ejections of an endpoint.",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.ejected = Gauge(
            "mercato_balancer_ejected",
            "1 while the endpoint is ejected.",
            ["pool", "endpoint"],
            registry=registry,
        )
        self.overflows = Counter(
            "mercato_balancer_ejection_overflows_total",
            "Ejections the max-ejection-percent cap refused.",
            ["pool", "endpoint"],
            registry=registry,
        )

    def for_pool(self, pool: str) -> PoolHooks:
        return PoolHooks(self, pool)


class PoolHooks:
    def __init__(self, metrics: PrometheusBalancerHooks, pool: str) -> None:
        self._m = metrics
        self._pool = pool

    def on_release(self, endpoint: str, outcome: Outcome) -> None:
        self._m.requests.labels(self._pool, endpoint, outcome.value).inc()

    def on_ejected(self, host: str, *, duration_s: float, times: int) -> None:
        self._m.ejections.labels(self._pool, host).inc()
        self._m.ejected.labels(self._pool, host).set(1)

    def on_returned(self, host: str) -> None:
        self._m.ejected.labels(self._pool, host).set(0)

    def on_overflow(self, host: str) -> None:
        self._m.overflows.labels(self._pool, host).inc()
