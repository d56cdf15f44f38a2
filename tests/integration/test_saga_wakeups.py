"""The saga runner wakes on work (ADR 0048): a notification from another process, a parked retry
falling due, a slot freed while more sagas are due; never only at its slow safety poll."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any

import pytest

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock, SystemClock
from mercato.kit.sagas import (
    PostgresSagaWakeups,
    RetrySchedule,
    SagaDefinition,
    SagaRunner,
    SagaStatus,
    SagaStore,
    Step,
    StepContext,
)
from tests.integration.test_sagas import NO_WAIT, Recorder, local, remote, start


async def test_a_runner_elsewhere_is_woken_by_a_notification_not_by_its_poll(
    container: Container, clock: ManualClock
) -> None:
    if container.db.dialect != "postgresql":
        pytest.skip("LISTEN/NOTIFY wake-ups are PostgreSQL's; SQLite runners share one process")
    rec = Recorder()
    definition = SagaDefinition("order", (local("reserve", rec),))
    # Two stores as two processes would have them: the starter's notifies, the runner's listens.
    starter = SagaStore(container.db, clock, wakeups=PostgresSagaWakeups(container.db))
    listening = PostgresSagaWakeups(container.db)
    runner = SagaRunner(
        container.db,
        SagaStore(container.db, clock),
        {"order": definition},
        clock,
        owner="far",
        poll_s=60.0,
        wakeups=listening,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.sleep(0.5)  # the listener connects, and the first (idle) poll has passed
        saga_id = await start(container, starter, definition)
        await asyncio.wait_for(rec.first_call.wait(), 5)  # far sooner than the 60 s poll
    finally:
        stop.set()
        await task  # lets the saga's move commit
    saga = await starter.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED


async def test_a_notification_is_sent_only_if_the_starting_transaction_commits(
    container: Container, clock: ManualClock
) -> None:
    if container.db.dialect != "postgresql":
        pytest.skip("LISTEN/NOTIFY wake-ups are PostgreSQL's")
    woken = asyncio.Event()
    stop = asyncio.Event()
    wakeups = PostgresSagaWakeups(container.db)
    listener = asyncio.create_task(wakeups.listen(woken.set, stop))
    store = SagaStore(container.db, clock, wakeups=wakeups)
    try:
        await asyncio.wait_for(woken.wait(), 5)  # the listener's own "look now" once connected
        woken.clear()

        async def failed_checkout() -> None:
            async with container.db.write() as conn:
                await store.start(conn, saga_type="order", data={}, correlation_id="c", deadline_s=60)
                raise RuntimeError("the checkout failed after starting its saga")

        with pytest.raises(RuntimeError):
            await failed_checkout()
        await asyncio.sleep(0.3)
        assert not woken.is_set()
        async with container.db.write() as conn:
            await store.start(conn, saga_type="order", data={}, correlation_id="c", deadline_s=60)
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        stop.set()
        await listener


async def test_a_parked_retry_wakes_its_own_runner_when_due_not_at_the_poll(container: Container) -> None:
    """Wake on work (ADR 0048): the runner's poll is a slow safety net; a saga it parked for a retry
    is taken again when the retry falls due."""
    clock = SystemClock()
    rec = Recorder()
    retry = RetrySchedule(max_attempts=3, base_s=0.3, cap_s=0.3)
    definition = SagaDefinition("order", (remote("authorize", rec, fail=1, retry=retry),))
    store = SagaStore(container.db, clock)
    runner = SagaRunner(
        container.db, store, {"order": definition}, clock, owner="parker", poll_s=60.0, rng=random.Random(2)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.sleep(0.2)  # the first (idle) pass is behind it: only a wake can start another
        saga_id = await start(container, store, definition)
        runner.wake()
        deadline = time.monotonic() + 5.0  # far sooner than the 60 s poll
        saga = await store.get(saga_id)
        while (saga is None or saga.status is not SagaStatus.COMPLETED) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            saga = await store.get(saga_id)
    finally:
        stop.set()
        await task
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED
    assert rec.calls[("authorize", "do")] == 2


async def test_a_backlog_bigger_than_the_slots_drains_without_waiting_for_the_poll(
    container: Container,
) -> None:
    """Every slot that opens while more sagas are due claims them at once. Waking only when a full
    runner dropped to one free slot left the other freed slots idle until the next poll (measured:
    210 due checkouts, no saga leased for 8 s, in `mercato bench checkout` at 50/s)."""
    clock = SystemClock()
    rec = Recorder()
    count = 24
    all_ran = asyncio.Event()

    async def slow(ctx: StepContext) -> Mapping[str, Any]:
        rec.hit(ctx, "do")
        if rec.calls[("pay", "do")] >= count:
            all_ran.set()
        # Staggered: slots free one at a time, as they do under load, never all at once.
        await asyncio.sleep(0.02 + 0.01 * (hash(ctx.saga_id) % 7))
        return {}

    async def undo(ctx: StepContext) -> None:
        rec.hit(ctx, "undo")

    definition = SagaDefinition("order", (Step("pay", slow, undo, timeout_s=5.0, retry=NO_WAIT),))
    store = SagaStore(container.db, clock)
    ids = [await start(container, store, definition) for _ in range(count)]
    runner = SagaRunner(
        container.db, store, {"order": definition}, clock, owner="drainer", concurrency=4, poll_s=60.0
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await asyncio.wait_for(all_ran.wait(), 10.0)  # far sooner than the 60 s poll
    finally:
        stop.set()
        await task
    assert rec.calls[("pay", "do")] == len(ids)
    for saga_id in ids:
        saga = await store.get(saga_id)
        assert saga is not None
        assert saga.status is SagaStatus.COMPLETED
