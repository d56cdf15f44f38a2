"""Resilience for calls to dependencies: deadlines, timeouts, retries, budgets, breakers, hedging, bulkheads.

Start with `ResiliencePolicy.for_dependency(name, p95_s=...)`; the pieces are usable alone. The
outgoing HTTP clients (`mercato.providers._client`) send `outgoing_deadline_headers()` themselves.
Every component takes an injectable `Clock` (and `Random`, `sleep`) so its
state machine is tested without sleeping, and a sequence of hooks for metrics
(`PrometheusResilienceHooks`). `set_testing(True)` removes backoff pauses in application tests.
"""

from mercato.kit.resilience.asgi import DeadlineMiddleware
from mercato.kit.resilience.backoff import full_jitter_backoff_s
from mercato.kit.resilience.breaker import BreakerConfig, BreakerSnapshot, CircuitBreaker, Permit
from mercato.kit.resilience.budget import RetryBudget
from mercato.kit.resilience.bulkhead import Bulkhead
from mercato.kit.resilience.deadline import (
    DEADLINE_HEADER,
    Deadline,
    current_deadline,
    deadline_scope,
    outgoing_deadline_headers,
    parse_deadline_header,
)
from mercato.kit.resilience.errors import BulkheadFull, CircuitOpen, DeadlineExceeded, ResilienceError
from mercato.kit.resilience.hedging import hedge_delay_s, hedged
from mercato.kit.resilience.hooks import (
    BreakerHooks,
    BreakerState,
    BulkheadHooks,
    Outcome,
    ResilienceHooks,
    RetryHooks,
)
from mercato.kit.resilience.latency import LatencyTracker
from mercato.kit.resilience.metrics import PrometheusResilienceHooks
from mercato.kit.resilience.policy import HedgeConfig, ResiliencePolicy
from mercato.kit.resilience.registry import BreakerRegistry
from mercato.kit.resilience.reports import BreakerReport, BreakerReports
from mercato.kit.resilience.retry import RetryPolicy, is_testing, retry_call, set_testing

__all__ = [
    "DEADLINE_HEADER",
    "BreakerConfig",
    "BreakerHooks",
    "BreakerRegistry",
    "BreakerReport",
    "BreakerReports",
    "BreakerSnapshot",
    "BreakerState",
    "Bulkhead",
    "BulkheadFull",
    "BulkheadHooks",
    "CircuitBreaker",
    "CircuitOpen",
    "Deadline",
    "DeadlineExceeded",
    "DeadlineMiddleware",
    "HedgeConfig",
    "LatencyTracker",
    "Outcome",
    "Permit",
    "PrometheusResilienceHooks",
    "ResilienceError",
    "ResilienceHooks",
    "ResiliencePolicy",
    "RetryBudget",
    "RetryHooks",
    "RetryPolicy",
    "current_deadline",
    "deadline_scope",
    "full_jitter_backoff_s",
    "hedge_delay_s",
    "hedged",
    "is_testing",
    "outgoing_deadline_headers",
    "parse_deadline_header",
    "retry_call",
    "set_testing",
]
