"""Metrics hook for limiters, and its Prometheus implementation."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["NoMetrics", "PrometheusRateLimitMetrics", "RateLimitMetrics"]


class RateLimitMetrics(Protocol):
    def decision(self, *, algorithm: str, backend: str, outcome: str) -> None:
        """One decision: `outcome` is `allowed`, `limited`, `degraded_allowed` or `degraded_limited`."""
        ...

    def backend_error(self, *, algorithm: str, backend: str, error: str) -> None:
        """The backend failed (`error` is the exception class name); the decision fell back to policy."""
        ...

    def degraded(self, *, algorithm: str, backend: str, active: bool) -> None:
        """The limiter entered (`True`) or left (`False`) degraded mode (its circuit opened or closed)."""
        ...


class NoMetrics:
    def decision(self, *, algorithm: str, backend: str, outcome: str) -> None:
        return None

    def backend_error(self, *, algorithm: str, backend: str, error: str) -> None:
        return None

    def degraded(self, *, algorithm: str, backend: str, active: bool) -> None:
        return None


class PrometheusRateLimitMetrics:
    """`mercato_ratelimit_decisions_total{algorithm,backend,outcome}`,
    `mercato_ratelimit_backend_errors_total{algorithm,backend,error}` and
    `mercato_ratelimit_degraded{algorithm,backend}` (1 while failing open/closed, else 0)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "mercato_ratelimit_decisions_total",
            "Rate-limit decisions by algorithm, backend and outcome.",
            ["algorithm", "backend", "outcome"],
            registry=registry,
        )
        self.backend_errors = Counter(
            "mercato_ratelimit_backend_errors_total",
            "Rate-limit backend failures (each answered by the fail-open/closed policy).",
            ["algorithm", "backend", "error"],
            registry=registry,
        )
        self.degraded_gauge = Gauge(
            "mercato_ratelimit_degraded",
            "1 while the limiter answers from its fail-open/closed policy (circuit open), else 0.",
            ["algorithm", "backend"],
            registry=registry,
        )

    def decision(self, *, algorithm: str, backend: str, outcome: str) -> None:
        self.decisions.labels(algorithm, backend, outcome).inc()

    def backend_error(self, *, algorithm: str, backend: str, error: str) -> None:
        self.backend_errors.labels(algorithm, backend, error).inc()

    def degraded(self, *, algorithm: str, backend: str, active: bool) -> None:
        self.degraded_gauge.labels(algorithm, backend).set(1 if active else 0)
