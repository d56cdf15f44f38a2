"""Background jobs: expired reservations give their units back without anyone asking."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import CollectorRegistry

from mercato.bootstrap import Container
from mercato.demo.seed import demo_products
from mercato.kit.clock import ManualClock
from mercato.workers import PeriodicJob, run_jobs, shop_jobs
from mercato.workers.runner import JobMetrics


async def test_the_sweeper_returns_units_of_expired_reservations(
    container: Container, clock: ManualClock
) -> None:
    [product] = await container.catalog.create_many(demo_products(1, random.Random(3)))
    await container.inventory.set_available(product.sku, 5)
    await container.inventory.reserve("order-1", [(product.sku, 3)])
    job = next(j for j in shop_jobs(container) if j.name == "expire_reservations")
    assert await job.run() == 0
    clock.advance(container.settings.shop.reservation_ttl_s + 1)
    assert await job.run() == 1
    level = await container.inventory.stock(product.sku)
    assert (level.available, level.reserved) == (5, 0)


async def test_runner_keeps_going_after_a_failed_pass_and_stops_when_told() -> None:
    calls = 0
    third_pass = asyncio.Event()

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            third_pass.set()
        if calls == 1:
            raise RuntimeError("database went away")
        return 1

    registry = CollectorRegistry()
    stop = asyncio.Event()
    runner = asyncio.create_task(
        run_jobs([PeriodicJob("flaky", 0.01, flaky)], stop, metrics=JobMetrics(registry))
    )
    await asyncio.wait_for(third_pass.wait(), timeout=2)
    stop.set()
    await asyncio.wait_for(runner, timeout=2)
    assert registry.get_sample_value("mercato_worker_job_failures_total", {"job": "flaky"}) == 1
    assert registry.get_sample_value("mercato_worker_job_items_total", {"job": "flaky"}) >= 2


async def test_a_full_batch_runs_again_without_waiting() -> None:
    backlog = [3, 3, 1]
    passes = 0
    third_pass = asyncio.Event()

    async def drain() -> int:
        nonlocal passes
        passes += 1
        if passes == 3:
            third_pass.set()
        return backlog.pop(0) if backlog else 0

    stop = asyncio.Event()
    # A one-hour interval: only the "full batch, go again" rule can make three passes happen.
    runner = asyncio.create_task(run_jobs([PeriodicJob("drain", 3600, drain, batch=3)], stop))
    await asyncio.wait_for(third_pass.wait(), timeout=2)
    stop.set()
    await asyncio.wait_for(runner, timeout=2)
    assert passes == 3
