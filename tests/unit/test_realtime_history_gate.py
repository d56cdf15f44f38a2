"""The subscriptions' history read gate (ADR 0078): bounded concurrency, arrival order, bounded wait."""

from __future__ import annotations

import asyncio

import pytest

from mercato.kit.realtime import ChannelEvent, GatedHistory, HistoryBusy, HistoryGate, Hub
from tests.unit.realtime_support import NoBroker, SeqHistory, queued_frames


class _SlowHistory:
    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.order: list[str] = []
        self.release = asyncio.Event()

    async def head(self, channel: str) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        self.order.append(channel)
        await self.release.wait()
        self.running -= 1
        return 7

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        await self.head(channel)
        return []


async def test_at_most_concurrency_reads_run_and_the_others_queue_in_arrival_order() -> None:
    inner = _SlowHistory()
    history = GatedHistory(inner, HistoryGate(concurrency=2, wait_s=5.0))
    reads = [asyncio.create_task(history.head(f"c{i}")) for i in range(6)]
    await asyncio.sleep(0.05)
    assert inner.running == 2
    assert history.gate.waiting == 4
    assert history.gate.in_use == 2
    inner.release.set()
    assert await asyncio.gather(*reads) == [7] * 6
    assert inner.most == 2
    assert inner.order == [f"c{i}" for i in range(6)]
    assert history.gate.in_use == 0


async def test_a_read_that_waits_past_the_deadline_is_told_to_try_again_and_holds_nothing() -> None:
    inner = _SlowHistory()
    gate = HistoryGate(concurrency=1, wait_s=0.1, retry_after_s=1.5)
    history = GatedHistory(inner, gate)
    first = asyncio.create_task(history.after("a", 0, limit=10))
    await asyncio.sleep(0.01)
    with pytest.raises(HistoryBusy) as busy:
        await history.head("b")
    assert busy.value.retry_after_s == 1.5
    assert gate.waiting == 0
    inner.release.set()
    assert await first == []
    assert await history.head("c") == 7  # the slot came back


async def test_a_subscribe_with_no_slot_in_time_is_left_unsubscribed() -> None:
    gate = HistoryGate(concurrency=1, wait_s=0.05)
    hub = Hub(NoBroker(), SeqHistory(3), node_id="n1", history_gate=gate)  # type: ignore[arg-type]
    conn = hub.connect("u1", kind="ws", on_refused=lambda: None)
    async with gate.slot():  # every slot taken (a storm)
        with pytest.raises(HistoryBusy):
            await hub.subscribe(conn, "room:a", since=0, presence=True)
    assert not conn.subscribed("room:a")
    assert hub.online("room:a") == []
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=4))
    assert len(conn.queue) == 0  # not a member of the channel's fan-out either
    await hub.subscribe(conn, "room:a", since=0)  # again, with a free slot: the whole history
    assert [f["seq"] for f in await queued_frames(conn)] == [1, 2, 3]


async def test_a_replay_under_way_waits_for_a_slot_instead_of_failing() -> None:
    gate = HistoryGate(concurrency=1, wait_s=0.05, retry_after_s=0.05)
    hub = Hub(NoBroker(), SeqHistory(3), node_id="n1", history_gate=gate)  # type: ignore[arg-type]
    conn = hub.connect("u1", kind="ws", on_refused=lambda: None)
    await hub.subscribe(conn, "room:a", since=None)  # live from the head (3)
    holder = asyncio.Event()

    async def hold() -> None:
        async with gate.slot():
            await holder.wait()

    blocker = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    hub.history.n = 6  # type: ignore[attr-defined]
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=6))  # 4 and 5 missed: a refill, gated
    await asyncio.sleep(0.2)  # longer than the gate's wait: the refill retried, not gave up
    assert len(conn.queue) == 0
    holder.set()
    await blocker
    await asyncio.sleep(0.2)
    assert [f["seq"] for f in await queued_frames(conn)] == [4, 5, 6]
