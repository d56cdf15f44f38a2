"""Bulkhead: a concurrency limit with a bounded FIFO queue and a fast refusal beyond it."""

from __future__ import annotations

import asyncio

import pytest

from mercato.kit.clock import ManualClock
from mercato.kit.resilience import Bulkhead, BulkheadFull, deadline_scope


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_rejects_immediately_beyond_capacity_without_a_queue() -> None:
    rejected: list[str] = []

    class Hooks:
        def on_bulkhead_rejected(self, name: str) -> None:
            rejected.append(name)

    bulkhead = Bulkhead("search", max_concurrent=2, hooks=[Hooks()])
    await bulkhead.acquire()
    await bulkhead.acquire()
    with pytest.raises(BulkheadFull) as caught:
        await bulkhead.acquire()
    assert caught.value.dependency == "search"
    assert bulkhead.in_flight == 2
    assert bulkhead.rejections == 1
    assert rejected == ["search"]
    bulkhead.release()
    await bulkhead.acquire()
    assert bulkhead.in_flight == 2


async def test_queue_is_fifo_and_a_released_slot_goes_to_the_oldest_waiter() -> None:
    bulkhead = Bulkhead("carrier", max_concurrent=1, max_queue=2, queue_timeout_s=60.0)
    order: list[str] = []
    await bulkhead.acquire()

    async def wait(name: str) -> None:
        async with bulkhead:
            order.append(name)

    first = asyncio.create_task(wait("first"))
    second = asyncio.create_task(wait("second"))
    await _settle()
    assert bulkhead.queued == 2
    with pytest.raises(BulkheadFull):
        await bulkhead.acquire()  # the queue is full too
    bulkhead.release()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert bulkhead.in_flight == 0
    assert bulkhead.queued == 0


async def test_a_queued_call_times_out_with_bulkhead_full() -> None:
    bulkhead = Bulkhead("carrier", max_concurrent=1, max_queue=1, queue_timeout_s=0.01)
    await bulkhead.acquire()
    with pytest.raises(BulkheadFull):
        await bulkhead.acquire()
    assert bulkhead.queued == 0
    assert bulkhead.in_flight == 1


async def test_queue_wait_is_bounded_by_the_deadline() -> None:
    clock = ManualClock()
    bulkhead = Bulkhead("carrier", max_concurrent=1, max_queue=1, queue_timeout_s=60.0)
    await bulkhead.acquire()
    with deadline_scope(timeout_s=1.0, clock=clock):
        clock.advance(1.0)
        with pytest.raises(BulkheadFull):
            await bulkhead.acquire()


async def test_a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() -> None:
    bulkhead = Bulkhead("carrier", max_concurrent=1, max_queue=2, queue_timeout_s=60.0)
    await bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire())
    await _settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.queued == 0
    bulkhead.release()
    assert bulkhead.in_flight == 0


async def test_concurrency_never_exceeds_the_limit_under_load() -> None:
    bulkhead = Bulkhead("db", max_concurrent=3, max_queue=100, queue_timeout_s=60.0)
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        async with bulkhead:
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0)
            running -= 1

    await asyncio.gather(*(work() for _ in range(50)))
    assert peak == 3
    assert bulkhead.in_flight == 0


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        Bulkhead(max_concurrent=0)
