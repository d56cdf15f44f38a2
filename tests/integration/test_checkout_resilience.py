"""The resilience policy in front of the real simulated PSP and carrier, and its edge mapping.

The shop's container runs on SQLite and PostgreSQL with both providers serving on local ports; the
PSP's own `/metrics` counter says what really reached it.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from mercato.bootstrap import Container, build_container, build_provider_calls
from mercato.config import CheckoutSettings
from mercato.demo.seed import demo_products
from mercato.gateway.app import create_app
from mercato.kit.ports import free_port
from mercato.kit.resilience import (
    BreakerRegistry,
    BulkheadFull,
    CircuitOpen,
    DeadlineExceeded,
    PrometheusResilienceHooks,
    current_deadline,
)
from mercato.kit.sagas import SagaRunner, SagaStatus
from mercato.providers._client import ProviderError, ProviderTimeout
from mercato.providers.config import ProviderSettings
from mercato.providers.psp.client import PspClient
from mercato.providers.server import RunningProviders, serve_providers
from mercato.shop.checkout.adapters import HttpPaymentGateway
from mercato.shop.checkout.model import ProviderRejected
from mercato.workers.sagas import build_saga_runner
from tests.conftest import make_settings
from tests.integration.provider_support import warm_up
from tests.tables import emptiable_tables


@dataclass
class Shop:
    container: Container
    providers: RunningProviders
    runner: SagaRunner
    sku: str
    psp_url: str


async def _shop(database_url: str, tmp_path: Path, *, resilience: bool) -> AsyncIterator[Shop]:
    providers_settings = ProviderSettings(
        psp_port=free_port(), carrier_port=free_port(), data_dir=tmp_path, graceful_shutdown_s=1
    )
    settings = make_settings(
        database_url,
        providers=providers_settings,
        # A breaker that trips after 4 calls and probes again after 0.3 s keeps the test short.
        checkout=CheckoutSettings(
            provider_timeout_s=0.5,
            provider_attempts=3,
            saga_deadline_s=60,
            resilience=resilience,
            breaker_minimum_calls=4,
            breaker_open_s=0.3,
        ),
    )
    providers = await serve_providers(providers_settings)
    await warm_up(providers_settings.psp_base_url, providers_settings.carrier_base_url)
    container = build_container(settings)
    try:
        [product] = await container.catalog.create_many(demo_products(1, random.Random(9)))
        await container.inventory.set_available(product.sku, 50)
        runner = build_saga_runner(container, owner="test-runner")
        yield Shop(container, providers, runner, product.sku, providers_settings.psp_base_url)
    finally:
        async with container.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(text(f'DELETE FROM "{table.name}"'))
        await container.close()
        await providers.stop()


@pytest.fixture
async def shop(database_url: str, tmp_path: Path) -> AsyncIterator[Shop]:
    async for built in _shop(database_url, tmp_path, resilience=True):
        yield built


@pytest.fixture
async def plain_shop(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Shop]:
    async for built in _shop(sqlite_url, tmp_path, resilience=False):
        yield built


async def checkout(shop: Shop, card_token: str | None = None) -> uuid.UUID:
    customer = uuid.uuid4()
    await shop.container.cart.set_item(customer, shop.sku, 1)
    order = await shop.container.checkout.start(customer, correlation_id="resilience", card_token=card_token)
    return order.id


async def finish(shop: Shop, order_ids: list[uuid.UUID], *, within_s: float = 20.0) -> list[SagaStatus]:
    """Drive until every saga is terminal (compensations wait for the breaker, hence the long bound)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within_s
    while loop.time() < until:
        await shop.runner.run_once()
        statuses = []
        for order_id in order_ids:
            saga = await shop.container.sagas.get(order_id)
            assert saga is not None
            statuses.append(saga.status)
        if all(status.terminal for status in statuses):
            return statuses
        await asyncio.sleep(0.05)
    raise AssertionError("sagas did not finish")


async def psp_posts_received(shop: Shop, route: str | None = None) -> int:
    async with httpx.AsyncClient(base_url=shop.psp_url) as client:
        body = (await client.get("/metrics")).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "mercato_provider_requests_received_total"
            and sample.labels["method"] == "POST"
            and sample.labels["route"].startswith("/v1/")
            and route in (None, sample.labels["route"])
        )
    )


async def set_psp_faults(shop: Shop, faults: dict[str, object]) -> None:
    async with httpx.AsyncClient(base_url=shop.psp_url) as client:
        (await client.put("/admin/faults", json=faults)).raise_for_status()


async def test_a_psp_outage_opens_the_breaker_and_rejected_attempts_never_reach_the_psp(shop: Shop) -> None:
    await set_psp_faults(shop, {"outage_for_s": 60})
    order_ids = [await checkout(shop) for _ in range(4)]
    assert await finish(shop, order_ids) == [SagaStatus.COMPENSATED] * 4
    errors = []
    for order_id in order_ids:
        errors += [
            h.error or ""
            for h in await shop.container.sagas.history(order_id)
            if h.step == "authorize_payment" and h.direction == "forward"
        ]
    rejected = [e for e in errors if "CircuitOpen" in e]
    assert rejected, errors
    # Each saga attempt that met an open circuit sent nothing: the PSP saw fewer authorizations than
    # the sagas made attempts, although every attempt that did reach it failed.
    assert await psp_posts_received(shop, "/v1/authorizations") <= len(errors) - len(rejected) + 2 * len(
        order_ids
    )
    assert await psp_posts_received(shop, "/v1/authorizations") < len(errors) * 3
    psp = shop.container.breakers.snapshot()["psp"]
    assert psp["rejections"] >= len(rejected)
    # The breaker's transitions and rejections are on the app's /metrics.
    app = create_app(shop.container.settings, container=shop.container, configure_logs=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        metrics = (await client.get("/metrics")).text
    assert (
        'mercato_breaker_transitions_total{dependency="psp",from_state="closed",to_state="open"}' in metrics
    )
    assert 'mercato_breaker_rejections_total{dependency="psp"}' in metrics


async def test_refusals_count_as_successes_and_are_not_retried(shop: Shop) -> None:
    registry = BreakerRegistry()
    hooks = PrometheusResilienceHooks(CollectorRegistry())
    # What is under test is the answer, not the clock: with the fixture's 0.5 s budget a loaded CI
    # machine once timed a capture out, which counts as a failure and is retried.
    base = shop.container.settings
    settings = base.model_copy(
        update={"checkout": base.checkout.model_copy(update={"provider_timeout_s": 10.0})}
    )
    calls = build_provider_calls(settings, breakers=registry, hooks=hooks, clock=shop.container.clock)
    psp = PspClient(shop.psp_url, timeout=ProviderTimeout(read_s=10.0, connect_s=10.0))
    gateway = HttpPaymentGateway(psp, calls.psp, reads=calls.psp_reads)
    sent_before = await psp_posts_received(shop)
    try:
        for _ in range(6):
            with pytest.raises(ProviderRejected):  # the PSP answers 404: a definite no
                await gateway.capture(
                    authorization_id=f"auth_{uuid.uuid4().hex}",
                    amount_minor=100,
                    idempotency_key=str(uuid.uuid4()),
                )
    finally:
        await psp.aclose()
    snapshot = registry.snapshot()["psp"]
    assert (snapshot["state"], snapshot["calls"], snapshot["failures"]) == ("closed", 6, 0)
    assert await psp_posts_received(shop) - sent_before == 6  # one attempt each: no retries


@pytest.mark.parametrize("separate_reads", [True, False])
async def test_lookups_and_undo_writes_have_their_own_breakers_so_compensations_get_through(
    shop: Shop, separate_reads: bool
) -> None:
    base = shop.container.settings
    # Open for a minute: whatever the lookups meet below, it is not a half-open probe.
    settings = base.model_copy(update={"checkout": base.checkout.model_copy(update={"breaker_open_s": 60})})
    registry = BreakerRegistry()
    calls = build_provider_calls(
        settings,
        breakers=registry,
        hooks=PrometheusResilienceHooks(CollectorRegistry()),
        clock=shop.container.clock,
        separate_reads=separate_reads,
    )
    gateway = HttpPaymentGateway(shop.container.psp, calls.psp, reads=calls.psp_reads, undo=calls.psp_undo)
    order = str(uuid.uuid4())
    # The authorization to undo is set-up, made outside the policy under test (whose 0.5 s budget a
    # loaded CI machine exceeded on this first write to a fresh provider database).
    setup = PspClient(shop.psp_url, timeout=ProviderTimeout(read_s=10.0, connect_s=10.0))
    try:
        held = await setup.authorize(
            order_reference=order, amount_minor=500, currency="EUR", idempotency_key=str(uuid.uuid4())
        )
    finally:
        await setup.aclose()
    await set_psp_faults(shop, {"outage_for_s": 60})
    for _ in range(4):
        with pytest.raises((ProviderError, CircuitOpen)):
            await gateway.authorize(
                order_reference=order, amount_minor=500, currency="EUR", idempotency_key=str(uuid.uuid4())
            )
    assert registry.snapshot()["psp"]["state"] == "open"
    if separate_reads:
        records = await gateway.payments_for(order)
        assert [r.authorization_id for r in records] == [held.authorization_id]
        assert registry.snapshot()["psp-reads"]["state"] == "closed"
        # The compensation's own write is sent (and meets the outage), not refused by the writes' circuit.
        with pytest.raises(ProviderError):
            await gateway.void(authorization_id=held.authorization_id, idempotency_key=str(uuid.uuid4()))
        assert registry.snapshot()["psp-undo"]["calls"] >= 1
        await set_psp_faults(shop, {})
        await gateway.void(authorization_id=held.authorization_id, idempotency_key=str(uuid.uuid4()))
        assert [r.status for r in await gateway.payments_for(order)] == ["voided"]
    else:
        with pytest.raises(CircuitOpen):  # the compensation's write waits for the writes' circuit
            await gateway.void(authorization_id=held.authorization_id, idempotency_key=str(uuid.uuid4()))
        with pytest.raises(CircuitOpen):  # the lookup is refused by the writes' breaker
            await gateway.payments_for(order)
        assert "psp-reads" not in registry.snapshot()


async def test_5xx_are_retried_within_the_budget_and_counted_as_failures(shop: Shop) -> None:
    await set_psp_faults(shop, {"error_rate": 1.0, "seed": 3})
    [psp_policy] = [p for p in shop.container.provider_policies if p.name == "psp"]
    assert psp_policy.budget is not None
    # The bucket refilled at 1/s while the fixture set the shop up, so the bound starts from its
    # balance now, not from its initial token.
    tokens_at_start = psp_policy.budget.tokens
    loop = asyncio.get_running_loop()
    started = loop.time()
    order_id = await checkout(shop)
    [status] = await finish(shop, [order_id])
    elapsed_s = loop.time() - started
    assert status is SagaStatus.COMPENSATED
    psp = shop.container.breakers.snapshot()["psp"]
    assert psp["failures"] >= 1
    retries = sum(
        sample.value
        for family in shop.container.metrics_registry.collect()
        for sample in family.samples
        if sample.name == "mercato_retry_attempts_total" and sample.labels["dependency"] == "psp"
    )
    assert retries >= 1  # a 5xx is worth another attempt
    # RetryBudget: retries <= balance + 0.1 * first attempts + 1/s * elapsed, whatever max_attempts.
    first_attempts = len(
        [h for h in await shop.container.sagas.history(order_id) if h.step == "authorize_payment"]
    )
    assert retries <= tokens_at_start + 0.1 * first_attempts + elapsed_s


async def test_resilience_off_calls_the_providers_directly(plain_shop: Shop) -> None:
    order_id = await checkout(plain_shop)
    assert await finish(plain_shop, [order_id]) == [SagaStatus.COMPLETED]
    assert len(plain_shop.container.breakers) == 0


def _edge_app(container: Container) -> FastAPI:
    app = create_app(container.settings, container=container, configure_logs=False)

    async def circuit_open() -> None:
        raise CircuitOpen("open", dependency="psp", retry_after_s=2.2)

    async def bulkhead_full() -> None:
        raise BulkheadFull("full", dependency="carrier")

    async def deadline() -> None:
        raise DeadlineExceeded("late", dependency="psp")

    async def remaining() -> dict[str, float | None]:
        current = current_deadline()
        return {"remaining_s": current.remaining_s() if current else None}

    for path, endpoint in [
        ("/test/circuit-open", circuit_open),
        ("/test/bulkhead-full", bulkhead_full),
        ("/test/deadline", deadline),
        ("/test/remaining", remaining),
    ]:
        app.add_api_route(path, endpoint, methods=["GET"])
    return app


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_resilience_errors_become_503_and_504_problems(container: Container) -> None:
    app = _edge_app(container)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        opened = await client.get("/test/circuit-open", headers={"X-Request-ID": "req-1"})
        full = await client.get("/test/bulkhead-full")
        late = await client.get("/test/deadline")
        with_deadline = await client.get("/test/remaining", headers={"X-Request-Deadline": "1500"})
        without = await client.get("/test/remaining")
    assert opened.status_code == 503
    assert opened.headers["content-type"] == "application/problem+json"
    assert opened.headers["retry-after"] == "3"
    body = opened.json()
    assert body["type"].endswith("/dependency-unavailable")
    assert body["request_id"] == "req-1"
    assert "psp" in body["detail"]
    assert (full.status_code, full.headers["retry-after"]) == (503, "1")
    assert late.status_code == 504
    assert late.json()["type"].endswith("/deadline-exceeded")
    assert "retry-after" not in late.headers
    assert 0 < with_deadline.json()["remaining_s"] <= 1.5
    assert without.json()["remaining_s"] is None


async def test_undo_breakers_keep_a_constant_open_wait_while_the_forward_ones_grow(shop: Shop) -> None:
    registry = BreakerRegistry()
    build_provider_calls(
        shop.container.settings,
        breakers=registry,
        hooks=PrometheusResilienceHooks(CollectorRegistry()),
        clock=shop.container.clock,
    )
    configs = {name: item["config"] for name, item in registry.snapshot().items()}
    open_s = shop.container.settings.checkout.breaker_open_s
    for undo in ("psp-undo", "carrier-undo"):
        assert configs[undo]["max_wait_s"] == open_s, "a compensation never waits out a doubled wait"
    assert configs["psp"]["max_wait_s"] == shop.container.settings.checkout.breaker_max_open_s > open_s
