"""Deadline propagation and hedged lookups against the simulators on a real port (SQLite and PostgreSQL).

- The provider clients send the time left (`X-Request-Deadline`); a simulator never runs a call whose
  deadline has passed, nor one whose deadline passes while it is still waiting: its ledger is unchanged.
- Checkout's record lookups are hedged: against a provider whose first answer is slow, the lookup
  returns at the hedge delay with exactly two requests sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client import CollectorRegistry

from mercato.bootstrap import build_provider_calls
from mercato.config import CheckoutSettings, Settings
from mercato.kit.clock import SystemClock
from mercato.kit.resilience import BreakerRegistry, PrometheusResilienceHooks, deadline_scope
from mercato.providers import CarrierClient, FaultSettings, ProviderError, PspClient
from mercato.providers.carrier import ShipmentItem, create_carrier_app
from mercato.providers.carrier.service import carrier_metadata
from mercato.providers.faults import FaultInjector
from mercato.providers.psp import create_psp_app
from mercato.providers.psp.service import psp_metadata
from mercato.shop.checkout.adapters import HttpShippingCarrier
from mercato.shop.checkout.resilient import (
    ProviderCalls,
    ProviderPolicySettings,
    build_provider_policy,
)

if TYPE_CHECKING:
    from tests.integration.provider_support import Served

pytest_plugins = ["tests.integration.provider_support"]


async def _ledger(base_url: str, order: str) -> list[object]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        response = await client.get("/v1/ledger", params={"order_reference": order})
    response.raise_for_status()
    return list(response.json()["items"])


async def test_a_call_whose_deadline_has_passed_is_not_run(provider_db_url: str, on_a_port: Served) -> None:
    app = create_psp_app(provider_db_url)
    async with on_a_port(app, psp_metadata) as base_url:
        order, key = f"ord-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        body = {"amount_minor": 1000, "currency": "EUR", "order_reference": order}
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as raw:
            late = await raw.post(
                "/v1/authorizations", json=body, headers={"Idempotency-Key": key, "X-Request-Deadline": "0"}
            )
        assert late.status_code == 504, late.text
        assert late.json()["type"] == "/problems/deadline-exceeded"
        assert await _ledger(base_url, order) == []

        # The provider waits 400 ms (a card network); our client has 100 ms left and says so.
        slow = FaultSettings(latency_p50_ms=400, latency_p99_ms=400)
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as raw:
            (await raw.put("/admin/faults", json=slow.model_dump())).raise_for_status()
        client = PspClient(base_url)
        try:
            started = time.perf_counter()
            with deadline_scope(timeout_s=0.1), pytest.raises(ProviderError) as caught:
                await client.authorize(
                    amount_minor=1000, currency="EUR", order_reference=order, idempotency_key=key
                )
            elapsed = time.perf_counter() - started
            assert caught.value.status == 504
            assert caught.value.slug == "deadline-exceeded"
            assert elapsed < 0.35  # answered at the deadline, not after the 400 ms of work
            await asyncio.sleep(0.5)
            assert await _ledger(base_url, order) == []  # nothing ran after the caller gave up

            # Not stored: the same key with time to spare runs the operation once.
            done = await client.authorize(
                amount_minor=1000, currency="EUR", order_reference=order, idempotency_key=key
            )
            assert done.status.value == "authorized"
            assert len(await _ledger(base_url, order)) == 1
        finally:
            await client.aclose()


def _seed_with_slow_first_read(settings: FaultSettings, *, slow_s: float, fast_s: float) -> int:
    """A seed whose first lookup draw is at least `slow_s` and whose second is at most `fast_s`.

    The simulator draws lookup latencies from `Random("reads-<seed>")`, so a local injector with the
    same settings replays the exact draws the server will make.
    """
    for seed in range(100_000):
        injector = FaultInjector(settings.model_copy(update={"seed": seed}))
        if injector.sample_read_latency_s() >= slow_s and injector.sample_read_latency_s() <= fast_s:
            return seed
    raise AssertionError("no seed found")


def _lookups_received(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("mercato_provider_requests_received_total{") and all(
            label in line for label in ('method="GET"', 'route="/v1/shipments"')
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_hedged_lookup_returns_at_the_hedge_delay_with_two_requests(
    provider_db_url: str, on_a_port: Served
) -> None:
    tail = FaultSettings(read_latency_p50_ms=20, read_latency_p99_ms=2000)
    seed = _seed_with_slow_first_read(tail, slow_s=1.0, fast_s=0.05)
    app = create_carrier_app(provider_db_url)
    async with on_a_port(app, carrier_metadata) as base_url:
        order = f"ord-{uuid.uuid4().hex[:8]}"
        client = CarrierClient(base_url)
        raw = httpx.AsyncClient(base_url=base_url, timeout=10)
        try:
            await client.create_shipment(
                order_reference=order,
                items=[ShipmentItem(sku="SKU-1", quantity=1)],
                idempotency_key=uuid.uuid4().hex,
            )

            async def lookup(hedge_delay_s: float | None) -> tuple[float, float, int]:
                # Applying the settings restarts the lookup draws from the seed: slow, then fast.
                faults = tail.model_copy(update={"seed": seed}).model_dump()
                (await raw.put("/admin/faults", json=faults)).raise_for_status()
                before = _lookups_received((await raw.get("/metrics")).text)
                # A generous attempt timeout (p95 3 s), so only the hedge can cut the slow answer short.
                knobs = ProviderPolicySettings(p95_s=3.0, total_timeout_s=8.0, hedge_delay_s=hedge_delay_s)
                policy = build_provider_policy("carrier-reads", knobs, breakers=BreakerRegistry())
                carrier = HttpShippingCarrier(client, reads=ProviderCalls(policy))
                started = time.perf_counter()
                found = await carrier.active_shipments_for(order)
                elapsed = time.perf_counter() - started
                after = _lookups_received((await raw.get("/metrics")).text)
                return elapsed, after - before, len(found)

            elapsed, requests, found = await lookup(hedge_delay_s=0.1)
            assert found == 1
            assert requests == 2
            assert 0.1 <= elapsed < 0.6, elapsed  # the hedge delay plus one fast answer, not the slow one

            # The same draws without hedging wait out the slow first answer.
            elapsed, requests, found = await lookup(hedge_delay_s=None)
            assert found == 1
            assert requests == 1
            assert elapsed >= 1.0
        finally:
            await raw.aclose()
            await client.aclose()


def test_the_running_system_hedges_lookups_and_never_writes() -> None:
    """`build_provider_calls` (what `mercato up`/`worker` use): lookups hedge after the p95, writes never."""
    settings = Settings(checkout=CheckoutSettings(provider_p95_s=0.25))
    registry_hooks = PrometheusResilienceHooks(CollectorRegistry())
    calls = build_provider_calls(
        settings, breakers=BreakerRegistry(), hooks=registry_hooks, clock=SystemClock()
    )
    for reads in (calls.psp_reads, calls.carrier_reads):
        assert reads.policy is not None
        assert reads.policy.hedge is not None
        assert reads.policy.hedge.fallback_delay_s == 0.25
    for writes in (calls.psp, calls.carrier, calls.psp_undo, calls.carrier_undo):
        assert writes.policy is not None
        assert writes.policy.hedge is None


async def test_attempts_cut_at_their_deadline_leave_nothing_behind_and_count_as_failures(
    provider_db_url: str, on_a_port: Served
) -> None:
    """A provider slower than the per-attempt timeout: every attempt is abandoned by us and stopped by
    the provider at the same deadline, so no authorization exists afterwards (without the header, the
    provider would finish the first attempt after we gave up), and the breaker counts each as a failure."""
    slow = FaultSettings(latency_p50_ms=400, latency_p99_ms=400)
    app = create_psp_app(provider_db_url, faults=slow)
    async with on_a_port(app, psp_metadata) as base_url:
        order = f"ord-{uuid.uuid4().hex[:8]}"
        breakers = BreakerRegistry()
        # Each attempt is cut at ~0.15 s (p95 + 25 %); the whole call's 10 s only bounds the test.
        # With 2 s, a CI machine that stalled for most of them ended the call between the attempts
        # (DeadlineExceeded, one failure counted) instead of at the second attempt's own cut.
        knobs = ProviderPolicySettings(p95_s=0.1, total_timeout_s=10.0, max_attempts=2)
        calls = ProviderCalls(build_provider_policy("psp", knobs, breakers=breakers))
        client = PspClient(base_url)
        try:
            with pytest.raises(TimeoutError):
                await calls(
                    lambda: client.authorize(
                        amount_minor=500,
                        currency="EUR",
                        order_reference=order,
                        idempotency_key=uuid.uuid4().hex,
                    )
                )
            await asyncio.sleep(0.6)  # past the provider's 400 ms: whatever it would still do, it did
            assert await _ledger(base_url, order) == []
            assert breakers.get("psp").snapshot()["failures"] == 2  # both attempts, retried with one key
        finally:
            await client.aclose()
