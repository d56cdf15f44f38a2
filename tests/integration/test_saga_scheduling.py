"""When sagas run, on both databases: which due saga is claimed first, and how long a retry waits.

Found by the checkout chaos run on SQLite (`mercato lab chaos --backend sqlite`): the worker ran
up to a minute behind the checkouts, and with due sagas claimed by `next_attempt_at` alone each
parked retry went to the back of that queue again, sagas past their deadline waited behind sagas
that still had time, and compensations refused by the PSP's open breaker spent their attempts and
escalated their backoff to 10 s; orders reached their terminal state 100-130 s after they started
against a 98 s bound.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.resilience import CircuitOpen
from mercato.kit.sagas import (
    RetrySchedule,
    SagaDefinition,
    SagaRunner,
    SagaStatus,
    SagaStore,
    Step,
    StepContext,
    StepRejected,
)


async def _start(container: Container, store: SagaStore, definition: SagaDefinition) -> uuid.UUID:
    async with container.db.write() as conn:
        return await store.start(
            conn, saga_type=definition.name, data={}, correlation_id="c", deadline_s=definition.deadline_s
        )


def _runner(
    container: Container, store: SagaStore, definition: SagaDefinition, clock: ManualClock
) -> SagaRunner:
    return SagaRunner(
        container.db,
        store,
        {definition.name: definition},
        clock,
        owner="scheduling-test",
        lease_s=10,
        concurrency=1,
        rng=random.Random(1),
    )


async def _noop(ctx: StepContext) -> Mapping[str, Any] | None:
    return None


async def test_a_retry_that_comes_due_is_claimed_before_sagas_started_after_it(
    container: Container, clock: ManualClock
) -> None:
    store = SagaStore(container.db, clock)
    definition = SagaDefinition("probe", (Step("pay", _noop),), deadline_s=60)
    first = await _start(container, store, definition)
    # The first saga's step failed and its retry is due 5 s later ...
    token = await store.claim(first, owner="a", lease_s=10)
    assert token is not None
    async with container.db.write() as conn:
        await store.fenced_update(
            conn,
            first,
            token,
            attempt=1,
            next_attempt_at=clock.now() + timedelta(seconds=5),
            lease_expires_at=clock.now(),
        )
    # ... while a backlog of sagas started in between (each due since its start) is still waiting.
    later = []
    for _ in range(3):
        clock.advance(1)
        later.append(await _start(container, store, definition))
    clock.advance(5)
    assert await store.due(limit=10) == [first, *later]
    [claimed] = await store.claim_due(owner="b", lease_s=10, limit=1)
    assert claimed.id == first


async def test_a_saga_past_its_deadline_is_compensated_before_newer_sagas_move_on(
    container: Container, clock: ManualClock
) -> None:
    store = SagaStore(container.db, clock)
    undone: list[uuid.UUID] = []
    done: list[uuid.UUID] = []

    async def pay(ctx: StepContext) -> Mapping[str, Any] | None:
        done.append(ctx.saga_id)
        return None

    async def refund(ctx: StepContext) -> None:
        undone.append(ctx.saga_id)

    definition = SagaDefinition("probe", (Step("pay", pay, refund), Step("ship", pay, None)), deadline_s=30)
    old = await _start(container, store, definition)
    token = await store.claim(old, owner="dead-runner", lease_s=1)
    assert token is not None
    async with container.db.write() as conn:  # it paid; shipping failed and its retry is parked
        await store.fenced_update(
            conn,
            old,
            token,
            step_index=1,
            attempt=1,
            next_attempt_at=clock.now() + timedelta(seconds=25),
            lease_expires_at=clock.now(),
        )
    clock.advance(20)
    new = await _start(container, store, definition)
    clock.advance(15)  # both are due; the old saga is past its deadline, the new one has 15 s left
    runner = _runner(container, store, definition, clock)
    assert await runner.run_once() == 1  # room for one saga: the one whose deadline passed
    saga = await store.get(old)
    assert saga is not None
    assert (saga.status, undone, done) == (SagaStatus.COMPENSATED, [old], [])
    assert await runner.run_once() == 1
    assert done == [new, new]


async def test_a_forward_retry_is_due_at_the_deadline_at_the_latest(
    container: Container, clock: ManualClock
) -> None:
    store = SagaStore(container.db, clock)

    async def unavailable(ctx: StepContext) -> Mapping[str, Any] | None:
        raise ConnectionError("provider down")

    slow_retry = RetrySchedule(max_attempts=5, base_s=100.0, cap_s=100.0)
    definition = SagaDefinition(
        "probe", (Step("pay", unavailable, None, timeout_s=1.0, retry=slow_retry),), deadline_s=5
    )
    saga_id = await _start(container, store, definition)
    runner = _runner(container, store, definition, clock)
    await runner.run_once()
    saga = await store.get(saga_id)
    assert saga is not None
    assert (saga.status, saga.attempt) == (SagaStatus.RUNNING, 1)
    # A backoff drawn from up to 100 s would leave the saga unclaimed long after its deadline.
    assert saga.next_attempt_at == saga.deadline_at
    clock.advance(5)
    await runner.run_once()
    saga = await store.get(saga_id)
    assert saga is not None
    assert (saga.status, saga.failure) == (SagaStatus.COMPENSATED, "saga deadline exceeded")


async def test_a_compensation_refused_by_an_open_breaker_spends_no_attempt_and_waits_for_it(
    container: Container, clock: ManualClock
) -> None:
    store = SagaStore(container.db, clock)
    refusals = {"left": 12}
    calls: list[str] = []

    async def refund(ctx: StepContext) -> None:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise CircuitOpen("circuit for 'psp' is open", dependency="psp", retry_after_s=4.0)
        calls.append(ctx.step)

    async def declined(ctx: StepContext) -> Mapping[str, Any] | None:
        raise StepRejected("declined")

    # Two attempts only: spending one per refusal would fail the saga for good on the second.
    definition = SagaDefinition(
        "probe",
        (
            Step("pay", _noop, refund, compensation_retry=RetrySchedule(max_attempts=2, base_s=5, cap_s=5)),
            Step("ship", declined, None),
        ),
        deadline_s=600,
    )
    saga_id = await _start(container, store, definition)
    runner = _runner(container, store, definition, clock)
    for _ in range(12):
        refused_at = clock.now()
        await runner.run_once()
        saga = await store.get(saga_id)
        assert saga is not None
        assert (saga.status, saga.attempt) == (SagaStatus.COMPENSATING, 0)
        # Due once the breaker admits calls again, not sooner, and not a growing backoff later.
        wait_s = (saga.next_attempt_at - refused_at).total_seconds()
        assert 4.0 <= wait_s <= 5.0
        clock.advance(wait_s)
    await runner.run_once()
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPENSATED
    assert calls == ["pay"]


async def test_a_claim_takes_no_more_sagas_than_its_limit(container: Container, clock: ManualClock) -> None:
    """On PostgreSQL `UPDATE … WHERE id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)` re-ran the
    subquery per updated row and claimed every due saga: a runner's `concurrency` meant nothing."""
    store = SagaStore(container.db, clock)
    definition = SagaDefinition("probe", (Step("pay", _noop),), deadline_s=60)
    started = []
    for _ in range(5):
        started.append(await _start(container, store, definition))
        clock.advance(1)
    claimed = await store.claim_due(owner="a", lease_s=10, limit=2)
    assert [saga.id for saga in claimed] == started[:2]
    assert [saga.id for saga in await store.claim_due(owner="b", lease_s=10, limit=10)] == started[2:]
