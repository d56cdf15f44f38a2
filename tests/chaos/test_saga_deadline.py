"""Saga deadlines under crashes: what is unknown is undone, what is done is never undone.

A saga whose deadline passes while a remote step's outcome is unknown must undo that step too.

Found by reasoning over the chaos run's failure windows: the capture is applied by the PSP but its
answer is lost (or the worker is SIGKILLed mid-call); the retry is parked; the deadline passes
before it is due. Compensation used to start at the step *before* the capture, so the shipment was
cancelled and the order cancelled while the customer's money stayed captured. Deterministic here:
the PSP loses every answer, then the clock jumps past the deadline.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from mercato.bootstrap import Container, build_container
from mercato.config import CheckoutSettings
from mercato.demo.seed import demo_products
from mercato.kit.clock import ManualClock
from mercato.kit.sagas import SagaDefinition, SagaRunner, SagaStatus, Step, StepContext
from mercato.lab.chaos import free_port
from mercato.providers.config import ProviderSettings
from mercato.providers.faults import FaultSettings
from mercato.providers.server import RunningProviders, serve_providers
from mercato.workers.sagas import build_saga_runner
from tests.conftest import make_settings
from tests.tables import emptiable_tables

pytestmark = pytest.mark.chaos


@pytest.fixture
async def shop(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Container, SagaRunner, ManualClock]]:
    providers_settings = ProviderSettings(
        psp_port=free_port(), carrier_port=free_port(), data_dir=tmp_path, graceful_shutdown_s=1
    )
    settings = make_settings(
        database_url,
        providers=providers_settings,
        checkout=CheckoutSettings(provider_timeout_s=0.5, provider_attempts=3, saga_deadline_s=60),
    )
    clock = ManualClock(datetime.now(UTC))
    providers: RunningProviders = await serve_providers(providers_settings)
    container = build_container(settings, clock=clock)
    try:
        yield container, build_saga_runner(container, owner="deadline-test"), clock
    finally:
        async with container.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(text(f'DELETE FROM "{table.name}"'))
        await container.close()
        await providers.stop()


async def _set_faults(base_url: str, faults: FaultSettings) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        (await client.put("/admin/faults", json=faults.model_dump(mode="json"))).raise_for_status()


async def test_a_capture_whose_answer_was_lost_is_refunded_when_the_deadline_passes(
    shop: tuple[Container, SagaRunner, ManualClock],
) -> None:
    container, runner, clock = shop
    [product] = await container.catalog.create_many(demo_products(1, random.Random(3)))
    await container.inventory.set_available(product.sku, 5)
    customer = uuid.uuid4()
    await container.cart.set_item(customer, product.sku, 1)
    order = await container.checkout.start(customer, correlation_id="deadline-test")
    definition = container.saga_definitions["order_checkout"]
    providers = container.settings.providers
    # The carrier is down: the saga authorizes, then parks its shipment's retry.
    await _set_faults(providers.carrier_base_url, FaultSettings(error_rate=1.0))
    await runner.run_once()
    saga = await container.sagas.get(order.id)
    assert saga is not None
    assert (saga.step_index, saga.attempt) == (definition.index_of("create_shipment"), 1)

    # The carrier is back; the PSP now applies the capture but its answer never arrives.
    await _set_faults(providers.carrier_base_url, FaultSettings())
    await _set_faults(providers.psp_base_url, FaultSettings(lost_response_rate=1.0))
    clock.advance(5)
    await runner.run_once()
    saga = await container.sagas.get(order.id)
    assert saga is not None
    assert (saga.status, saga.step_index, saga.attempt) == (
        SagaStatus.RUNNING,
        definition.index_of("capture_payment"),
        1,
    )
    [ledger] = (await container.psp.summary(order_reference=str(order.id))).orders
    assert ledger.captures == 1  # taken, though the shop does not know it

    # The provider recovers, but the saga's deadline has passed before its retry: it compensates.
    await _set_faults(providers.psp_base_url, FaultSettings())
    clock.advance(61)
    for _ in range(100):
        await runner.run_once()
        saga = await container.sagas.get(order.id)
        assert saga is not None
        if saga.status.terminal:
            break
        clock.advance(15)  # compensation retries are parked on the manual clock
    assert saga.status is SagaStatus.COMPENSATED
    [ledger] = (await container.psp.summary(order_reference=str(order.id))).orders
    assert (ledger.captures, ledger.refunds, ledger.captured_minor - ledger.refunded_minor) == (1, 1, 0)
    shipments = await container.carrier.shipments(order_reference=str(order.id))
    assert [s.status for s in shipments.items] == ["cancelled"]
    stock = await container.inventory.stock(product.sku)
    assert (stock.available, stock.reserved, stock.committed) == (5, 0, 0)


async def test_a_saga_whose_last_step_committed_completes_even_past_its_deadline(
    container: Container, clock: ManualClock
) -> None:
    """Found by the chaos run on PostgreSQL: the worker was killed after the last step (mark the
    order complete, commit the stock) committed but before the saga was marked finished; the next
    runner saw the deadline passed and compensated a completed order — refund, cancel the shipment —
    then failed for good releasing the reservation already committed."""
    undone: list[str] = []

    async def noop(ctx: StepContext) -> None:
        return None

    async def undo(ctx: StepContext) -> None:
        undone.append(ctx.step)

    definition = SagaDefinition(
        "deadline_probe",
        (Step("pay", noop, undo), Step("finish", noop, None, local=True)),  # type: ignore[arg-type]
        deadline_s=5,
    )
    async with container.db.write() as conn:
        saga_id = await container.sagas.start(
            conn, saga_type="deadline_probe", data={}, correlation_id="t", deadline_s=5
        )
    # A runner claims it and commits both steps' progress, then dies before finishing.
    token = await container.sagas.claim(saga_id, owner="dead-runner", lease_s=2)
    assert token is not None
    async with container.db.write() as conn:
        await container.sagas.fenced_update(conn, saga_id, token, step_index=2, attempt=0)
    clock.advance(10)  # its lease expired, and so did the saga's deadline
    runner = SagaRunner(
        container.db, container.sagas, {"deadline_probe": definition}, clock, owner="next-runner", lease_s=2
    )
    assert await runner.run_once() == 1
    saga = await container.sagas.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED
    assert undone == []
