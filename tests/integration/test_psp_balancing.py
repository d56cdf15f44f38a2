"""The shop's PSP client balances over 3 real PSP simulator processes (one shared PostgreSQL
database: three instances of one provider) and ejects the one that fails (ADR 0039).

psp1 answers every business request 500/503 (its fault switch). Checkouts still complete: the saga's
retry lands on another instance (same Idempotency-Key: the shared store answers once), psp1 is
ejected after `consecutive_5xx` failures, and no later call goes to it while it is out.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from mercato.bootstrap import Container, build_container
from mercato.cluster.processes import alive, read_pid, spawn, stop, wait_until
from mercato.config import CheckoutSettings
from mercato.demo.seed import demo_products
from mercato.kit.balancing import Balancer
from mercato.kit.ports import free_port
from mercato.kit.sagas import SagaRunner, SagaStatus
from mercato.providers._client import ProviderTimeout
from mercato.providers.config import ProviderSettings
from mercato.providers.psp.client import PspClient
from mercato.workers.sagas import build_saga_runner
from tests.conftest import make_settings
from tests.integration.provider_support import provider_pg_url, warm_up
from tests.tables import emptiable_tables

__all__ = ["provider_pg_url"]


@dataclass
class Simulators:
    psp: list[str]
    carrier: str


def _serve(folder: Path, name: str, kind: str, port: int, database_url: str) -> str:
    argv = [sys.executable, "-m", "mercato.cli.main", "provider", kind, "--port", str(port)]
    spawn(folder, name, [*argv, "--database-url", database_url])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not alive(read_pid(folder, name)):
            return True  # exited: the assertion below shows its log
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200

    assert wait_until(up, timeout_s=60), (folder / f"{name}.log").read_text()
    assert alive(read_pid(folder, name)), (folder / f"{name}.log").read_text()
    return url


@pytest.fixture(scope="module")
def simulators(provider_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulators]:
    folder = tmp_path_factory.mktemp("hlb_psps")
    names = ["psp0", "psp1", "psp2", "carrier"]
    try:
        # psp0 first: it creates the shared tables; then the others side by side.
        psps = [_serve(folder, "psp0", "psp", free_port(), provider_pg_url)]
        carrier_db = f"sqlite+aiosqlite:///{folder}/carrier.db"
        with ThreadPoolExecutor(3) as pool:
            later = [
                pool.submit(_serve, folder, f"psp{i}", "psp", free_port(), provider_pg_url) for i in (1, 2)
            ]
            carrier_started = pool.submit(_serve, folder, "carrier", "carrier", free_port(), carrier_db)
            psps += [f.result() for f in later]
            carrier = carrier_started.result()
        asyncio.run(warm_up(psps[0], carrier))
        httpx.put(f"{psps[1]}/admin/faults", json={"error_rate": 1.0}, timeout=5).raise_for_status()
        yield Simulators(psps, carrier)
    finally:
        for name in names:
            stop(folder, name, timeout_s=10)


@dataclass
class Shop:
    container: Container
    runner: SagaRunner
    sku: str
    balancer: Balancer


@pytest.fixture
async def shop(simulators: Simulators, sqlite_url: str) -> AsyncIterator[Shop]:
    carrier_port = int(simulators.carrier.rsplit(":", 1)[1])
    providers = ProviderSettings(
        psp_base_urls=simulators.psp,
        carrier_port=carrier_port,
        balance="round_robin",  # the blindest policy: every instance gets its turn until ejected
        outlier_consecutive_5xx=2,
        outlier_base_ejection_s=60,
    )
    settings = make_settings(
        sqlite_url,
        providers=providers,
        checkout=CheckoutSettings(provider_timeout_s=3.0, provider_attempts=4, saga_deadline_s=90),
    )
    container = build_container(settings)
    balancer = container.psp.balancer
    assert balancer is not None
    [product] = await container.catalog.create_many(demo_products(1, random.Random(uuid.uuid4().int)))
    await container.inventory.set_available(product.sku, 50)
    try:
        yield Shop(container, build_saga_runner(container, owner="hlb-test"), product.sku, balancer)
    finally:
        # The SQLite database is the session's: leave it empty for the tests after this one.
        async with container.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(text(f'DELETE FROM "{table.name}"'))
        await container.close()


async def _finish(shop: Shop, order_id: uuid.UUID) -> SagaStatus:
    for _ in range(400):
        await shop.runner.run_once()
        saga = await shop.container.sagas.get(order_id)
        assert saga is not None
        if saga.status.terminal:
            return saga.status
        await asyncio.sleep(0.02)
    raise AssertionError("saga did not finish")


async def test_a_failing_psp_instance_is_ejected_and_checkouts_complete(
    shop: Shop, simulators: Simulators
) -> None:
    failing = simulators.psp[1]
    orders = []
    for _ in range(6):
        customer = uuid.uuid4()
        await shop.container.cart.set_item(customer, shop.sku, 1)
        order = await shop.container.checkout.start(customer, correlation_id="hlb")
        assert await _finish(shop, order.id) is SagaStatus.COMPLETED
        orders.append(order.id)
    stats = {s.endpoint: s for s in shop.balancer.stats()}
    assert stats[failing].ejected
    assert stats[failing].times_ejected == 1
    # Two failures ejected it; nothing was sent there afterwards, the healthy two took the rest.
    assert stats[failing].picked == stats[failing].failures == 2
    assert all(stats[u].failures == 0 for u in simulators.psp if u != failing)
    assert sum(stats[u].picked for u in simulators.psp if u != failing) >= 12  # authorize + capture × 6
    # Each order paid exactly once, whichever instances its calls went to.
    audit = PspClient(simulators.psp[0], timeout=ProviderTimeout(read_s=10, connect_s=10))
    try:
        for order_id in orders:
            [ledger] = (await audit.summary(order_reference=str(order_id))).orders
            assert (ledger.authorizations, ledger.captures) == (1, 1)
    finally:
        await audit.aclose()
    metrics = shop.container.metrics_registry
    ejections = metrics.get_sample_value(
        "mercato_balancer_ejections_total", {"pool": "psp", "endpoint": failing}
    )
    assert ejections == 1
