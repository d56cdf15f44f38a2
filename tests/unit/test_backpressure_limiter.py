"""The concurrency limiter: class ordering, bounded queues, handoff order and fail-fast refusals."""

from __future__ import annotations

import asyncio
import time

import pytest

from mercato.kit.backpressure import ClassLimits, ConcurrencyLimiter, Overloaded, Priority
from mercato.kit.clock import ManualClock


class ListHook:
    """Records every hook call."""

    def __init__(self) -> None:
        self.waits: list[tuple[Priority, float]] = []
        self.sheds: list[tuple[Priority, str]] = []
        self.levels: list[int] = []

    def admitted(self, priority: Priority, *, queue_wait_s: float) -> None:
        self.waits.append((priority, queue_wait_s))

    def shed(self, priority: Priority, *, reason: str) -> None:
        self.sheds.append((priority, reason))

    def inflight_changed(self, inflight: int) -> None:
        self.levels.append(inflight)


def limiter(
    limit: int = 10,
    *,
    queue_size: int = 2,
    timeout_s: float = 10.0,
    clock: ManualClock | None = None,
    hook: ListHook | None = None,
) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(
        max_inflight=limit,
        classes={
            Priority.CRITICAL: ClassLimits(share=1.0, queue_size=queue_size, queue_timeout_s=timeout_s),
            Priority.NORMAL: ClassLimits(share=0.8, queue_size=queue_size, queue_timeout_s=timeout_s),
            Priority.SHEDDABLE: ClassLimits(share=0.5, queue_size=queue_size, queue_timeout_s=timeout_s),
        },
        retry_after_s=2,
        clock=clock,
        hook=hook,
    )


def test_ceilings_reserve_headroom_for_higher_classes() -> None:
    lim = limiter(10)
    assert [lim.ceiling(p) for p in Priority] == [10, 8, 5]
    admitted = {p: 0 for p in Priority}
    for priority in (Priority.SHEDDABLE, Priority.NORMAL, Priority.CRITICAL):
        while lim.try_acquire(priority):
            admitted[priority] += 1
    # Sheddable fills its five, normal the next three, critical the last two.
    assert admitted == {Priority.SHEDDABLE: 5, Priority.NORMAL: 3, Priority.CRITICAL: 2}
    assert lim.inflight == 10


def test_lower_class_is_refused_while_higher_ones_still_get_in() -> None:
    lim = limiter(10)
    for _ in range(6):
        assert lim.try_acquire(Priority.NORMAL)
    assert not lim.try_acquire(Priority.SHEDDABLE)  # 6 >= 5: catalog browsing is shed first
    assert lim.try_acquire(Priority.NORMAL)
    assert lim.try_acquire(Priority.CRITICAL)


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    hook = ListHook()
    lim = limiter(1, queue_size=1, hook=hook)
    assert lim.try_acquire(Priority.SHEDDABLE)
    waiting = asyncio.create_task(lim.acquire(Priority.SHEDDABLE))
    await asyncio.sleep(0)
    assert lim.queued(Priority.SHEDDABLE) == 1
    start = time.perf_counter()
    with pytest.raises(Overloaded) as refused:
        await lim.acquire(Priority.SHEDDABLE)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.005  # fail fast: no waiting when the queue is full
    assert refused.value.reason == "queue_full"
    assert refused.value.retry_after_s == 2
    assert hook.sheds == [(Priority.SHEDDABLE, "queue_full")]
    lim.release()
    await waiting
    assert lim.inflight == 1


async def test_a_zero_length_queue_never_waits() -> None:
    lim = ConcurrencyLimiter(
        max_inflight=1,
        classes={p: ClassLimits(share=1.0, queue_size=0, queue_timeout_s=1.0) for p in Priority},
    )
    await lim.acquire(Priority.CRITICAL)
    start = time.perf_counter()
    for _ in range(100):
        with pytest.raises(Overloaded):
            await lim.acquire(Priority.CRITICAL)
    assert (time.perf_counter() - start) / 100 < 0.005


async def test_queued_request_times_out_after_its_class_timeout() -> None:
    hook = ListHook()
    lim = limiter(1, timeout_s=0.02, hook=hook)
    assert lim.try_acquire(Priority.CRITICAL)
    start = time.perf_counter()
    with pytest.raises(Overloaded) as refused:
        await lim.acquire(Priority.NORMAL)
    assert 0.015 <= time.perf_counter() - start < 0.5
    assert refused.value.reason == "queue_timeout"
    assert lim.queued(Priority.NORMAL) == 0
    assert hook.sheds == [(Priority.NORMAL, "queue_timeout")]
    lim.release()
    assert lim.inflight == 0


async def test_freed_slot_goes_to_the_highest_class_first_and_waits_are_measured() -> None:
    clock = ManualClock()
    hook = ListHook()
    lim = limiter(2, clock=clock, hook=hook)
    assert lim.try_acquire(Priority.CRITICAL)
    assert lim.try_acquire(Priority.CRITICAL)
    order: list[Priority] = []

    async def wait_then_record(priority: Priority) -> None:
        await lim.acquire(priority)
        order.append(priority)

    sheddable = asyncio.create_task(wait_then_record(Priority.SHEDDABLE))
    await asyncio.sleep(0)
    normal = asyncio.create_task(wait_then_record(Priority.NORMAL))
    await asyncio.sleep(0)
    critical = asyncio.create_task(wait_then_record(Priority.CRITICAL))
    await asyncio.sleep(0)
    clock.advance(0.003)
    lim.release()  # one slot (inflight 1 < 2): the critical waiter, though it came last
    await critical
    assert order == [Priority.CRITICAL]
    lim.release()
    lim.release()  # inflight 0: normal (ceiling 1) then sheddable (ceiling 1) must wait its turn
    await normal
    assert order == [Priority.CRITICAL, Priority.NORMAL]
    assert not sheddable.done()
    lim.release()
    await sheddable
    assert order == [Priority.CRITICAL, Priority.NORMAL, Priority.SHEDDABLE]
    assert (Priority.CRITICAL, pytest.approx(0.003)) in hook.waits
    lim.release()
    assert lim.inflight == 0


async def test_new_arrivals_do_not_overtake_queued_requests_of_their_class() -> None:
    lim = limiter(1)
    assert lim.try_acquire(Priority.NORMAL)
    queued = asyncio.create_task(lim.acquire(Priority.NORMAL))
    await asyncio.sleep(0)
    lim.release()  # handed straight to the waiter: inflight stays 1
    assert lim.inflight == 1
    assert not lim.try_acquire(Priority.NORMAL)
    await queued
    lim.release()


async def test_a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() -> None:
    lim = limiter(1)
    assert lim.try_acquire(Priority.NORMAL)
    queued = asyncio.create_task(lim.acquire(Priority.NORMAL))
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert lim.queued(Priority.NORMAL) == 0
    lim.release()
    assert lim.inflight == 0


async def test_slot_context_manager_releases_on_error() -> None:
    hook = ListHook()
    lim = limiter(3, hook=hook)
    seen: list[int] = []

    async def failing_work() -> None:
        async with lim.slot(Priority.NORMAL):
            seen.append(lim.inflight)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await failing_work()
    assert seen == [1]
    assert lim.inflight == 0
    assert hook.levels == [1, 0]


def test_release_without_acquire_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        limiter().release()


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="larger share"):
        ConcurrencyLimiter(
            max_inflight=4,
            classes={
                Priority.CRITICAL: ClassLimits(share=0.5, queue_size=1, queue_timeout_s=0.1),
                Priority.NORMAL: ClassLimits(share=0.8, queue_size=1, queue_timeout_s=0.1),
                Priority.SHEDDABLE: ClassLimits(share=0.2, queue_size=1, queue_timeout_s=0.1),
            },
        )
    with pytest.raises(ValueError):
        ConcurrencyLimiter(max_inflight=0)
    with pytest.raises(ValueError):
        ClassLimits(share=0.0, queue_size=1, queue_timeout_s=0.1)
