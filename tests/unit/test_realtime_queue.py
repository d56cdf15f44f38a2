"""The outbound queue's caps: oldest non-essential dropped first, essential never silently lost."""

from __future__ import annotations

import asyncio

from mercato.kit.realtime import Offer, OutboundQueue


def test_under_caps_everything_is_queued_in_order() -> None:
    queue = OutboundQueue(max_messages=3, max_bytes=100)
    assert [queue.offer(f"{i}".encode(), essential=True) for i in range(3)] == [Offer.QUEUED] * 3
    got = [asyncio.run(queue.get())[0] for _ in range(3)]
    assert got == [b"0", b"1", b"2"]


def test_oldest_non_essential_goes_first() -> None:
    queue = OutboundQueue(max_messages=3, max_bytes=1000)
    queue.offer(b"m1", essential=True)
    queue.offer(b"typing-old", essential=False)
    queue.offer(b"typing-new", essential=False)
    assert queue.offer(b"m2", essential=True) is Offer.QUEUED
    assert queue.dropped == 1
    frames = [asyncio.run(queue.get())[0] for _ in range(3)]
    assert frames == [b"m1", b"typing-new", b"m2"]


def test_a_non_essential_frame_that_cannot_fit_is_dropped_itself() -> None:
    queue = OutboundQueue(max_messages=2, max_bytes=1000)
    queue.offer(b"m1", essential=True)
    queue.offer(b"m2", essential=True)
    assert queue.offer(b"presence", essential=False) is Offer.DROPPED
    assert len(queue) == 2


def test_essential_overflow_then_refusal_at_the_hard_cap() -> None:
    queue = OutboundQueue(max_messages=2, max_bytes=1000, hard_factor=2.0)
    assert queue.offer(b"a", essential=True) is Offer.QUEUED
    assert queue.offer(b"b", essential=True) is Offer.QUEUED
    assert queue.offer(b"c", essential=True) is Offer.OVERFLOW
    assert queue.over_cap
    assert queue.offer(b"d", essential=True) is Offer.OVERFLOW
    assert queue.offer(b"e", essential=True) is Offer.REFUSED
    assert len(queue) == 4


def test_byte_cap_bounds_memory() -> None:
    queue = OutboundQueue(max_messages=10_000, max_bytes=1000, hard_factor=1.5)
    results = [queue.offer(b"x" * 100, essential=True) for _ in range(100)]
    assert Offer.REFUSED in results
    assert queue.size_bytes <= 1500


async def test_wait_below_cap_returns_once_drained() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=1000)
    queue.offer(b"a", essential=True)
    queue.offer(b"b", essential=True)
    waiter = asyncio.create_task(queue.wait_below_cap())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await queue.get()
    await asyncio.wait_for(waiter, 1)
