"""The kit's process pool (ADR 0053): jobs run in other processes, the queue is bounded (refused at
once, or after waiting for room), a worker that dies surfaces as `WorkerCrashed` and the pool
recovers, and the counts are on the registry."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from mercato.kit.processes import PoolFull, ProcessPool, WorkerCrashed


def _sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _die() -> None:
    os._exit(3)  # what an OOM kill or a segfault looks like from the pool: the process is gone


def _fail() -> None:
    raise ValueError("bad input")


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the pool never reached the state")


def _value(registry: CollectorRegistry, name: str) -> float:
    found = registry.get_sample_value(name, {"pool": "t"})
    assert found is not None, name
    return found


@pytest.fixture
async def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def pool(registry: CollectorRegistry) -> AsyncIterator[ProcessPool]:
    p = ProcessPool(name="t", max_workers=1, max_queued=1, wait_s=0, registry=registry)
    yield p
    await p.close()


async def test_jobs_run_in_another_process_and_errors_pass_through(
    pool: ProcessPool, registry: CollectorRegistry
) -> None:
    assert await pool.run(_sleep_then_pid, 0) != os.getpid()
    with pytest.raises(ValueError, match="bad input"):
        await pool.run(_fail)
    assert _value(registry, "mercato_process_pool_completed_total") == 2


async def test_a_full_queue_refuses_at_once(pool: ProcessPool, registry: CollectorRegistry) -> None:
    await pool.warm_up()
    running = asyncio.create_task(pool.run(_sleep_then_pid, 1.0))
    queued = asyncio.create_task(pool.run(_sleep_then_pid, 0))
    await _until(lambda: pool.queued == 1 and pool.running == 1)
    assert _value(registry, "mercato_process_pool_running") == 1
    assert _value(registry, "mercato_process_pool_queued") == 1
    started = time.monotonic()
    with pytest.raises(PoolFull):
        await pool.run(_sleep_then_pid, 0)
    assert time.monotonic() - started < 0.5  # refused, not queued behind the running job
    assert _value(registry, "mercato_process_pool_rejected_total") == 1
    assert len({await running, await queued}) == 1  # one worker process ran both
    assert (pool.queued, pool.running) == (0, 0)
    assert _value(registry, "mercato_process_pool_queued") == 0


async def test_a_full_queue_makes_the_caller_wait_for_room_then_refuses(registry: CollectorRegistry) -> None:
    pool = ProcessPool(name="t", max_workers=1, max_queued=0, wait_s=10.0, registry=registry)
    try:
        await pool.warm_up()
        first = asyncio.create_task(pool.run(_sleep_then_pid, 0.5))
        await _until(lambda: pool.running == 1)
        started = time.monotonic()
        await pool.run(_sleep_then_pid, 0)  # waited for the first to finish, then ran
        assert time.monotonic() - started > 0.2
        await first
        pool.wait_s = 0.2
        hold = asyncio.create_task(pool.run(_sleep_then_pid, 1.0))
        await _until(lambda: pool.running == 1)
        with pytest.raises(PoolFull, match=r"full for 0\.2 s"):
            await pool.run(_sleep_then_pid, 0)
        await hold
        assert _value(registry, "mercato_process_pool_rejected_total") == 1
    finally:
        await pool.close()


async def test_a_dead_worker_is_an_error_and_the_pool_recovers(
    pool: ProcessPool, registry: CollectorRegistry
) -> None:
    before = await pool.run(_sleep_then_pid, 0)
    with pytest.raises(WorkerCrashed):
        await pool.run(_die)
    assert _value(registry, "mercato_process_pool_crashed_total") == 1
    after = await pool.run(_sleep_then_pid, 0)
    assert after not in (before, os.getpid())  # a fresh worker process
    assert (pool.queued, pool.running) == (0, 0)


async def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        ProcessPool(max_workers=0)
