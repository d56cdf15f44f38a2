"""Prometheus implementations of the hook Protocols."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mercato.kit.observability.metrics import LATENCY_BUCKETS
from mercato.kit.resilience.hooks import BreakerState, Outcome

__all__ = ["STATE_VALUES", "PrometheusResilienceHooks"]

# Ordered by severity so `max by (dependency)` and `> 0` alerts read naturally.
STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class PrometheusResilienceHooks:
    """Breaker, retry and bulkhead hooks: `mercato_breaker_*`, `mercato_retry_*`, `mercato_bulkhead_*`.

    Every series is labelled by `dependency`. Register one instance per `CollectorRegistry` and pass it
    to every component: prometheus_client refuses a second registration of the same names.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.state = Gauge(
            "mercato_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["dependency"],
            registry=registry,
        )
        self.transitions = Counter(
            "mercato_breaker_transitions_total",
            "Circuit breaker state transitions.",
            ["dependency", "from_state", "to_state"],
            registry=registry,
        )
        self.calls = Counter(
            "mercato_breaker_calls_total",
            "Calls admitted by a circuit breaker, by outcome (success, failure, ignored).",
            ["dependency", "outcome"],
            registry=registry,
        )
        self.call_duration = Histogram(
            "mercato_breaker_call_duration_seconds",
            "Duration of calls admitted by a circuit breaker.",
            ["dependency"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            "mercato_breaker_rejections_total",
            "Calls refused because the circuit was open (or its half-open probes were taken).",
            ["dependency"],
            registry=registry,
        )
        self.retries = Counter(
            "mercato_retry_attempts_total",
            "Extra attempts beyond the first: retries and hedges.",
            ["dependency", "kind"],
            registry=registry,
        )
        self.retries_denied = Counter(
            "mercato_retry_denied_total",
            "Retryable failures not retried, by reason (budget, deadline, not_idempotent).",
            ["dependency", "reason"],
            registry=registry,
        )
        self.bulkhead_rejections = Counter(
            "mercato_bulkhead_rejections_total",
            "Calls refused because the dependency's bulkhead was full.",
            ["dependency"],
            registry=registry,
        )

    def on_state_change(self, name: str, old: BreakerState | None, new: BreakerState) -> None:
        self.state.labels(name).set(STATE_VALUES[new])
        if old is not None:
            self.transitions.labels(name, old.value, new.value).inc()

    def on_call(self, name: str, outcome: Outcome, duration_s: float) -> None:
        self.calls.labels(name, outcome.value).inc()
        if outcome is not Outcome.IGNORED:
            self.call_duration.labels(name).observe(duration_s)

    def on_rejected(self, name: str) -> None:
        self.rejections.labels(name).inc()

    def on_retry(self, name: str, *, attempt: int, wait_s: float, cause: BaseException | None) -> None:
        self.retries.labels(name, "retry").inc()

    def on_retry_denied(self, name: str, *, reason: str) -> None:
        self.retries_denied.labels(name, reason).inc()

    def on_hedge(self, name: str) -> None:
        self.retries.labels(name, "hedge").inc()

    def on_bulkhead_rejected(self, name: str) -> None:
        self.bulkhead_rejections.labels(name).inc()
