"""The resilience policies in front of the providers' calls (breakers, retries, hedged lookups), per
provider and per kind of call; part of the composition root."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mercato.config import Settings
from mercato.kit.clock import Clock
from mercato.kit.resilience import BreakerRegistry, PrometheusResilienceHooks
from mercato.shop.checkout.resilient import (
    CARRIER,
    CARRIER_READS,
    CARRIER_UNDO,
    PSP,
    PSP_READS,
    PSP_UNDO,
    ProviderCalls,
    ProviderPolicySettings,
    build_provider_policy,
)


@dataclass(frozen=True, slots=True)
class ProviderCallSet:
    """The policies checkout's provider calls go through, per provider: the forward writes, the
    record lookups, and the compensations' writes."""

    psp: ProviderCalls
    psp_reads: ProviderCalls
    psp_undo: ProviderCalls
    carrier: ProviderCalls
    carrier_reads: ProviderCalls
    carrier_undo: ProviderCalls


def build_provider_calls(
    settings: Settings,
    *,
    breakers: BreakerRegistry,
    hooks: PrometheusResilienceHooks,
    clock: Clock,
    separate_reads: bool = True,
) -> ProviderCallSet:
    """Each provider under its own policy, or plain when `checkout.resilience` is off.

    With `separate_reads` each provider's lookups and compensating writes get policies and breakers
    of their own (see `shop/checkout/resilient.py`); without it everything shares the writes' policy.
    """
    checkout = settings.checkout
    if not checkout.resilience:
        plain = ProviderCalls()
        return ProviderCallSet(plain, plain, plain, plain, plain, plain)
    # The whole call (retries included) gets provider_timeout_s, which the saga step's timeout
    # (provider_timeout_s + 0.5) encloses; the p95 is capped so one attempt fits in that budget.
    policy = ProviderPolicySettings(
        p95_s=min(checkout.provider_p95_s, 0.8 * checkout.provider_timeout_s),
        total_timeout_s=checkout.provider_timeout_s,
        max_concurrent=checkout.provider_max_concurrent,
        minimum_calls=checkout.breaker_minimum_calls,
        consecutive_failures=checkout.breaker_consecutive_failures,
        window_s=checkout.breaker_window_s,
        open_s=checkout.breaker_open_s,
        max_open_s=checkout.breaker_max_open_s,
        half_open_probes=checkout.breaker_half_open_probes,
    )

    # Compensations' writes keep a breaker (an undo path that is itself failing stops being hammered)
    # but not the growing wait: they are few, every saga's deadline waits on them, and a breaker that
    # flaps under a high error rate would otherwise park each of them for 5 + 10 + 20 s (seen in the
    # SQLite chaos run: the last late orders were compensations waiting out those waits).
    undo_policy = replace(policy, max_open_s=policy.open_s)

    def calls(name: str, knobs: ProviderPolicySettings = policy) -> ProviderCalls:
        return ProviderCalls(
            build_provider_policy(name, knobs, breakers=breakers, hooks=[hooks], clock=clock)
        )

    # Lookups are hedged after their observed p95 (the configured p95 while cold); see resilient.py.
    reads_policy = replace(policy, hedge_delay_s=policy.p95_s)

    psp, carrier = calls(PSP), calls(CARRIER)
    if not separate_reads:
        return ProviderCallSet(psp, psp, psp, carrier, carrier, carrier)
    return ProviderCallSet(
        psp=psp,
        psp_reads=calls(PSP_READS, reads_policy),
        psp_undo=calls(PSP_UNDO, undo_policy),
        carrier=carrier,
        carrier_reads=calls(CARRIER_READS, reads_policy),
        carrier_undo=calls(CARRIER_UNDO, undo_policy),
    )
