"""Worker CPU per order saga, measured in one process: robust to a machine shared with other work.

`python src/mercato/bench/saga_cpu.py DATABASE N` (PostgreSQL at 127.0.0.1:5432, user postgres):
creates DATABASE anew, migrates it, starts the PSP and carrier simulators as subprocesses, starts
20 warm-up checkouts and drives them, then starts N checkouts and drives all N sagas with the
worker's runner (as `build_saga_runner` makes it; `run_once` until nothing is due). It prints this
process's CPU (`time.process_time`) divided by N over the drive (the claim, the moves and step
records, the local steps, the outbox inserts and the HTTP calls to the simulators; not the side
jobs) and over the starts (a cart line and `CheckoutService.start`: the API's database work for a
checkout, without HTTP). It imports only long-standing APIs, so an older `src/` can be measured with
the same file through `PYTHONPATH` (docs/benchmarks.md, sections "h-saga" and "Session 9: h-co")"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from mercato.bench.servers import start_simulators
from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.config import AuthSettings, CheckoutSettings, DatabaseSettings, Environment, Settings
from mercato.demo.seed import demo_products
from mercato.kit.sagas import SagaInstance, SagaRunner
from mercato.kit.storage.migrations import upgrade
from mercato.providers.config import ProviderSettings

_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_WARM_UP = 20


async def _create(database: str) -> None:
    admin = await asyncpg.connect(_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()


def _runner(container: Container) -> SagaRunner:
    """The worker's runner as `workers/sagas.build_saga_runner` builds it, without its metrics hook."""
    checkout = container.settings.checkout
    return SagaRunner(
        container.db,
        container.sagas,
        container.saga_definitions,
        container.clock,
        owner="saga-cpu",
        events=container.saga_events,
        lease_s=checkout.saga_lease_s,
        concurrency=checkout.saga_concurrency,
    )


async def _start(container: Container, sku: str, count: int) -> list[uuid.UUID]:
    ids = []
    for _ in range(count):
        customer = uuid.uuid4()
        await container.cart.set_item(customer, sku, 1)
        ids.append((await container.checkout.start(customer, correlation_id="saga-cpu")).id)
    return ids


async def _drive(container: Container, runner: SagaRunner, ids: list[uuid.UUID]) -> list[SagaInstance]:
    while True:
        await runner.run_once()
        sagas = [s for i in ids if (s := await container.sagas.get(i)) is not None and s.status.terminal]
        if len(sagas) == len(ids):
            return sagas
        await asyncio.sleep(0.05)


async def measure(url: str, count: int, data_dir: Path) -> str:
    providers = start_simulators(data_dir)
    psp_port, carrier_port = (server.port for server in providers)
    try:
        settings = Settings(
            env=Environment.TEST,
            database=DatabaseSettings(url=url, pool_size=20, max_overflow=40, probe_interval_s=0),
            auth=AuthSettings(secret="s" * 48, argon2_time_cost=1, argon2_memory_kib=8192),  # type: ignore[arg-type]
            providers=ProviderSettings(psp_port=psp_port, carrier_port=carrier_port, data_dir=data_dir),
            checkout=CheckoutSettings(provider_timeout_s=5, saga_deadline_s=600),
        )
        container = build_container(settings)
        try:
            [product] = await container.catalog.create_many(demo_products(1, random.Random(9)))
            await container.inventory.set_available(product.sku, 10 * (count + _WARM_UP))
            runner = _runner(container)
            await _drive(container, runner, await _start(container, product.sku, _WARM_UP))
            start_cpu = time.process_time()
            ids = await _start(container, product.sku, count)
            start_cpu = time.process_time() - start_cpu
            cpu, wall = time.process_time(), time.perf_counter()
            while await runner.run_once():
                pass
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            sagas = await _drive(container, runner, ids)
        finally:
            await container.close()
    finally:
        for server in providers:
            server.stop()
    completed = sum(1 for s in sagas if s.status.value == "completed")
    return (
        f"{count} sagas ({completed} completed): {cpu / count * 1000:.2f} ms CPU per saga, "
        f"{wall / count * 1000:.2f} ms wall per saga; starting them (cart line + checkout "
        f"transaction, no HTTP) {start_cpu / count * 1000:.2f} ms CPU each; load {os.getloadavg()[0]:.1f}"
    )


def main(database: str, count: int) -> None:
    asyncio.run(_create(database))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
    upgrade(SCRIPT_LOCATION, url)
    data_dir = Path(tempfile.mkdtemp(prefix=f"saga-cpu-{database}-"))
    print(f"{database}: {asyncio.run(measure(url, count, data_dir))}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
