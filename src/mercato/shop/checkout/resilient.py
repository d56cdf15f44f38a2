"""The resilience policy every call checkout makes to the payment provider and the carrier goes through.

One `ResiliencePolicy` per dependency ("psp", "carrier"), composed by the kit in its documented order:
deadline → retry (+ budget) → circuit breaker → bulkhead → per-attempt timeout → call. Each provider's
record lookups (the reads a compensation makes to learn what exists) get a second policy, with its own
breaker ("psp-reads", "carrier-reads"), and the compensations' own writes (void, refund, cancel
shipment) a third ("psp-undo", "carrier-undo"): a forward path whose circuit is open must not stop the
compensations that would undo its partial effects (measured by `mercato lab breaker`; in the chaos
run, compensations queued behind the writes' breaker were the last orders to finish late). Each still
has a breaker, so an undo path that is itself failing stops being hammered.

The lookups are hedged (`hedge_delay_s`): a lookup with no answer after the reads' observed p95 (the
configured p95 while fewer than 20 were timed) sends one backup copy and keeps the first success, so
one slow provider instance or a lost packet costs the p95, not the timeout. Only lookups: two copies
of a keyed write would meet at the provider as `409 idempotency-key-in-flight`. A backup draws on the
retry budget, so under an outage hedging adds at most the budget's share of extra load.

Every attempt sends its remaining time downstream (`X-Request-Deadline`, see `providers/_client.py`);
a provider that answers `504 deadline-exceeded` stopped at our deadline without applying the call: the
same event as our own timeout firing, and classified as one (a failure when the per-attempt timeout
set the deadline, since the provider was slower than its p95 allows; ignored when the caller's
tighter deadline did), then retried with the same key like any timeout.

How provider answers are classified (what the breaker counts, what the retry loop retries):

==========================================  =================  =========
answer                                      breaker            retried
==========================================  =================  =========
2xx                                         success            no
4xx (a definite refusal: the provider is    success            no
up and answered)
409 idempotency-key-in-flight               success            yes
504 deadline-exceeded (stopped at our       as our own timeout  yes
deadline, nothing applied)
5xx                                         failure            yes
timeout, refused or dropped connection      failure            yes
CircuitOpen / BulkheadFull / Deadline...    (not a call)       never
==========================================  =================  =========

Every provider call is idempotent (each POST carries an Idempotency-Key; the rest are reads), so every
call may be retried. Retries draw on a budget of 10 % of calls (+ a trickle per second), so an outage
multiplies the provider's load by at most ~1.1 instead of by `max_attempts`.

The policy's total deadline sits inside the saga step's timeout: when the policy gives up, the saga
still owns the step and records an uncertain failure, parks, and tries again later with its own
backoff. `CircuitOpen` and `BulkheadFull` reach the saga as ordinary exceptions, which it treats as
uncertain and retryable; that is right for them because nothing was sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mercato.kit.clock import Clock
from mercato.kit.resilience import (
    BreakerConfig,
    BreakerRegistry,
    Bulkhead,
    HedgeConfig,
    LatencyTracker,
    ResilienceError,
    ResilienceHooks,
    ResiliencePolicy,
    RetryBudget,
    RetryPolicy,
)
from mercato.providers._client import ProviderError

__all__ = [
    "CARRIER",
    "CARRIER_READS",
    "CARRIER_UNDO",
    "PSP",
    "PSP_READS",
    "PSP_UNDO",
    "ProviderCalls",
    "ProviderPolicySettings",
    "TransientProviderError",
    "build_provider_policy",
    "is_provider_failure",
]

T = TypeVar("T")

PSP = "psp"
CARRIER = "carrier"
PSP_READS = "psp-reads"
CARRIER_READS = "carrier-reads"
PSP_UNDO = "psp-undo"
CARRIER_UNDO = "carrier-undo"


class TransientProviderError(ProviderError):
    """A `ProviderError` worth another attempt (5xx, or 409 idempotency-key-in-flight).

    A distinct type because `RetryPolicy` picks what to retry by exception type, and a 4xx
    `ProviderError` must not be retried. It keeps `status` and `problem`, so checkout's translation of
    provider errors treats it exactly like the original.
    """


def is_provider_failure(exc: BaseException) -> bool:
    """What the breaker counts against the provider's health (see the module table)."""
    if isinstance(exc, ProviderError):
        return exc.status >= 500
    if isinstance(exc, ResilienceError):
        return False
    return isinstance(exc, Exception)


DEADLINE_EXCEEDED = "deadline-exceeded"

_RETRY_ON: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,  # ProviderUnavailable: no answer, outcome unknown
    TransientProviderError,
)


@dataclass(frozen=True, kw_only=True)
class ProviderPolicySettings:
    """The knobs of one provider policy (from `CheckoutSettings`).

    - `p95_s`: the provider's observed p95; the per-attempt timeout is `p95_s + max(0.05, 0.25 * p95_s)`
      (guide: "slightly above p95"), and a call at least `p95_s` long counts as slow for the breaker.
    - `total_timeout_s`: the whole call, retries and backoff included; keep it below the saga step's
      timeout so the step, not an abandoned inner attempt, decides what happens next.
    - the breaker trips at `failure_rate` failures or `slow_call_rate` slow calls over `window_s`
      once `minimum_calls` were made, or on `consecutive_failures` failures in a row; it stays open
      `open_s` (jittered down by up to 20 %), then lets `half_open_probes` through; each failed
      probe round doubles the wait, up to `max_open_s`, until the circuit closes again.
    - `hedge_delay_s`: None, no hedging; else hedge after the observed p95 of the calls, this delay
      while fewer than 20 were timed (for idempotent lookups only).

    Why these breaker numbers (ADR 0021, measured by `mercato lab breaker`): a provider that hangs is
    learnt of only when timeouts fire, so every call admitted until the trip pays the per-attempt
    timeout. The rate rule alone waits for the healthy calls of the last `window_s` to slide out
    (measured at 5 checkouts/s: tripped 5.0 s into the outage, 63 hung attempts); the run of 8
    trips one timeout plus 8 calls after the outage began (2.2 s, 17). Eight and not fewer so that
    independent errors do not trip it: at 20 % errors about one false trip in 500,000 calls, at
    10 % one in 100 million. One probe and a doubling wait keep the calls sent into a long outage
    to a handful; the 30 s cap bounds how long a provider that is back stays refused.
    """

    p95_s: float
    total_timeout_s: float
    max_attempts: int = 3
    max_concurrent: int = 64
    retry_ratio: float = 0.1
    failure_rate: float = 0.5
    slow_call_rate: float = 0.5
    minimum_calls: int = 20
    consecutive_failures: int = 8
    window_s: float = 10.0
    open_s: float = 5.0
    max_open_s: float = 30.0
    half_open_probes: int = 1
    hedge_delay_s: float | None = None

    @property
    def attempt_timeout_s(self) -> float:
        return min(self.total_timeout_s, self.p95_s + max(0.05, 0.25 * self.p95_s))


def build_provider_policy(
    name: str,
    settings: ProviderPolicySettings,
    *,
    breakers: BreakerRegistry,
    hooks: Sequence[ResilienceHooks] = (),
    clock: Clock | None = None,
) -> ResiliencePolicy:
    """The guide's defaults (as `ResiliencePolicy.for_dependency`), with provider error classification.

    The breaker comes from `breakers`, so the admin snapshot and the metrics see the very breaker the
    calls go through; the registry is expected to carry the same `hooks`.
    """
    breaker = breakers.get(
        name,
        config=BreakerConfig(
            failure_rate_threshold=settings.failure_rate,
            slow_call_rate_threshold=settings.slow_call_rate,
            slow_call_duration_s=settings.p95_s,
            minimum_calls=settings.minimum_calls,
            consecutive_failures=settings.consecutive_failures,
            window_s=settings.window_s,
            wait_s=settings.open_s,
            max_wait_s=settings.max_open_s,
            half_open_probes=settings.half_open_probes,
        ),
    )
    return ResiliencePolicy(
        name,
        retry=RetryPolicy(
            max_attempts=settings.max_attempts,
            timeout_s=settings.attempt_timeout_s,
            base_s=0.05,
            cap_s=1.0,
            retry_on=_RETRY_ON,
        ),
        total_timeout_s=settings.total_timeout_s,
        breaker=breaker,
        bulkhead=Bulkhead(
            name,
            max_concurrent=settings.max_concurrent,
            max_queue=settings.max_concurrent,
            queue_timeout_s=0.1,
            hooks=hooks,
        ),
        budget=RetryBudget(ratio=settings.retry_ratio, min_retries_per_s=1.0, clock=clock),
        latency=LatencyTracker(),
        hedge=HedgeConfig(fallback_delay_s=settings.hedge_delay_s)
        if settings.hedge_delay_s is not None
        else None,
        is_failure=is_provider_failure,
        clock=clock,
        hooks=hooks,
    )


class ProviderCalls:
    """Runs provider calls under a policy, or as they are when there is none (resilience switched off).

    The off switch exists for the breaker experiment (`mercato lab breaker`) and as an operational
    escape hatch; with it, only the saga's own step retries remain.
    """

    def __init__(self, policy: ResiliencePolicy | None = None) -> None:
        self.policy = policy

    async def __call__(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self.policy is None:
            return await fn()

        async def attempt() -> T:
            try:
                return await fn()
            except TransientProviderError:
                raise
            except ProviderError as exc:
                if exc.slug == DEADLINE_EXCEEDED:
                    raise TimeoutError(str(exc)) from exc
                if exc.retryable:
                    raise TransientProviderError(exc.status, exc.problem) from exc
                raise

        # Idempotent: every provider POST carries an Idempotency-Key, the rest are reads. Hedged only
        # where the policy has a HedgeConfig (the lookups' policies).
        return await self.policy.call(attempt, idempotent=True, hedge=True)
