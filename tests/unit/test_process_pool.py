"""The kit's process pool (ADR 0053): jobs run in other processes, the queue is bounded (refused at
once, or after waiting for room), a worker that dies surfaces as `WorkerCrashed` and the pool
recovers, and the counts are on the registry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
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


_OWNER = """
import asyncio, os, sys
from mercato.kit.processes import ProcessPool

async def main() -> None:
    pool = ProcessPool(name="orphans", max_workers=2)
    await pool.warm_up()
    print(" ".join(str(p) for p in pool._current_executor()._processes), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_exit_when_the_owner_is_killed() -> None:
    # A SIGKILLed `mercato worker` used to leave its pool's workers, and through them the
    # forkserver, running for good (seen after every chaos test).
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(workers) == 2
        assert all(_alive(pid) for pid in workers)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # not to leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left
