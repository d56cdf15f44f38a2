"""The saga engine on both databases: forward, compensation, retries, crash resume, fencing."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.coordination import LeaseLost
from mercato.kit.messaging.tables import outbox
from mercato.kit.sagas import (
    EventSink,
    RetrySchedule,
    SagaDefinition,
    SagaInstance,
    SagaRunner,
    SagaStatus,
    SagaStore,
    Step,
    StepContext,
    StepRejected,
)
from mercato.kit.sagas.events import OutboxEventSink
from mercato.kit.sagas.store import StepOutcome
from mercato.kit.storage import get_meta, set_meta
from mercato.kit.storage.meta import platform_meta
from tests.integration.statement_budget import Tally, counting


def verbs_of(statements: list[str]) -> list[str]:
    return [sql.removeprefix("driver: ").split(None, 1)[0].upper() for sql in statements]


NO_WAIT = RetrySchedule(max_attempts=3, base_s=0.0, cap_s=0.0)


class Recorder:
    """Counts every call per (saga, step, direction): what a remote system would have seen."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.order: list[str] = []
        self.keys: set[str] = set()
        self.first_call = asyncio.Event()

    def hit(self, ctx: StepContext, direction: str) -> None:
        self.first_call.set()
        self.calls[(ctx.step, direction)] += 1
        self.order.append(f"{direction}:{ctx.step}")
        self.keys.add(ctx.idempotency_key)


class ListSink:
    def __init__(self) -> None:
        self.events: list[Mapping[str, Any]] = []

    async def add(self, conn: AsyncConnection, events: Sequence[Mapping[str, Any]]) -> None:
        # Written through the saga's own connection: committed or rolled back with the step.
        for event in events:
            await conn.execute(
                insert(platform_meta).values(
                    key=f"event:{uuid.uuid4().hex[:20]}",
                    value=str(event["type"]),
                    updated_at=await _now(conn),
                )
            )
        self.events.extend(events)


async def _now(conn: AsyncConnection) -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def remote(
    name: str,
    rec: Recorder,
    *,
    fail: int = 0,
    reject: bool = False,
    hang: bool = False,
    undo_fails: bool = False,
    retry: RetrySchedule = NO_WAIT,
    timeout_s: float = 0.2,
) -> Step:
    remaining = {"fail": fail}

    async def action(ctx: StepContext) -> Mapping[str, Any]:
        rec.hit(ctx, "do")
        if hang:
            await asyncio.sleep(3600)
        if reject:
            raise StepRejected(f"{name} declined")
        if remaining["fail"] > 0:
            remaining["fail"] -= 1
            raise ConnectionError(f"{name} unavailable")
        ctx.emit(f"{name}_done", {"step": name})
        return {f"{name}_ref": f"ref-{name}"}

    async def compensation(ctx: StepContext) -> None:
        rec.hit(ctx, "undo")
        if undo_fails:
            raise ConnectionError("cannot undo")

    return Step(
        name,
        action,
        compensation,
        timeout_s=timeout_s,
        retry=retry,
        compensation_retry=RetrySchedule(max_attempts=2, base_s=0.0, cap_s=0.0),
    )


def local(name: str, rec: Recorder, *, fail: bool = False, timeout_s: float = 1.0) -> Step:
    async def action(ctx: StepContext) -> Mapping[str, Any]:
        rec.hit(ctx, "do")
        assert ctx.conn is not None
        await set_meta(ctx.conn, f"effect:{ctx.saga_id}:{name}", "done", now=await _now(ctx.conn))
        if fail:
            raise RuntimeError("local step broke after writing")
        return {}

    async def compensation(ctx: StepContext) -> None:
        rec.hit(ctx, "undo")
        assert ctx.conn is not None
        await set_meta(ctx.conn, f"effect:{ctx.saga_id}:{name}", "undone", now=await _now(ctx.conn))

    return Step(name, action, compensation, local=True, timeout_s=timeout_s, retry=NO_WAIT)


async def start(container: Container, store: SagaStore, definition: SagaDefinition) -> uuid.UUID:
    async with container.db.write() as conn:
        return await store.start(
            conn,
            saga_type=definition.name,
            data={"order": "o-1"},
            correlation_id="corr-1",
            deadline_s=definition.deadline_s,
        )


def runner_for(
    container: Container,
    store: SagaStore,
    definition: SagaDefinition,
    clock: ManualClock,
    owner: str = "runner-a",
    sink: EventSink | None = None,
) -> SagaRunner:
    return SagaRunner(
        container.db,
        store,
        {definition.name: definition},
        clock,
        owner=owner,
        events=sink,
        lease_s=10,
        rng=random.Random(1),
    )


async def effect(container: Container, saga_id: uuid.UUID, step: str) -> str | None:
    async with container.db.read() as conn:
        return await get_meta(conn, f"effect:{saga_id}:{step}")


@pytest.fixture
def store(container: Container, clock: ManualClock) -> SagaStore:
    return SagaStore(container.db, clock)


async def test_happy_path_completes_with_history_data_and_events(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec, sink = Recorder(), ListSink()
    definition = SagaDefinition(
        "order", (local("reserve", rec), remote("authorize", rec), remote("ship", rec))
    )
    saga_id = await start(container, store, definition)
    assert await runner_for(container, store, definition, clock, sink=sink).run_once() == 1
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED
    assert saga.data == {"order": "o-1", "authorize_ref": "ref-authorize", "ship_ref": "ref-ship"}
    assert rec.order == ["do:reserve", "do:authorize", "do:ship"]
    assert [(h.step, h.outcome) for h in await store.history(saga_id)] == [
        ("reserve", "succeeded"),
        ("authorize", "succeeded"),
        ("ship", "succeeded"),
    ]
    assert [e["type"] for e in sink.events] == ["authorize_done", "ship_done"]
    assert all(e["correlation_id"] == "corr-1" for e in sink.events)
    assert await effect(container, saga_id, "reserve") == "done"


async def test_a_rejection_compensates_only_the_steps_before_it_newest_first(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition(
        "order",
        (
            local("reserve", rec),
            remote("authorize", rec),
            remote("ship", rec, reject=True),
            remote("capture", rec),
        ),
    )
    saga_id = await start(container, store, definition)
    await runner_for(container, store, definition, clock).run_once()
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPENSATED
    assert rec.order == ["do:reserve", "do:authorize", "do:ship", "undo:authorize", "undo:reserve"]
    assert saga.failure is not None
    assert "ship declined" in saga.failure
    assert await effect(container, saga_id, "reserve") == "undone"


async def test_uncertain_failures_are_retried_then_the_step_itself_is_compensated(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition("order", (remote("authorize", rec), remote("ship", rec, fail=99)))
    saga_id = await start(container, store, definition)
    runner = runner_for(container, store, definition, clock)
    while (saga := await store.get(saga_id)) is not None and not saga.status.terminal:
        await runner.run_once()
    assert saga is not None
    assert saga.status is SagaStatus.COMPENSATED
    assert rec.calls[("ship", "do")] == 3
    # The ship call may have happened though it never answered: it is undone too.
    assert rec.order[-2:] == ["undo:ship", "undo:authorize"]
    assert {
        h.outcome for h in await store.history(saga_id) if h.step == "ship" and h.direction == "forward"
    } == {"failed"}


async def test_a_transient_failure_recovers_on_retry(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition("order", (remote("authorize", rec, fail=2),))
    saga_id = await start(container, store, definition)
    runner = runner_for(container, store, definition, clock)
    for _ in range(5):
        await runner.run_once()
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED
    assert rec.calls[("authorize", "do")] == 3
    assert len(rec.keys) == 1  # every retry carried the same idempotency key


async def test_a_failed_local_step_leaves_no_effect_and_is_not_compensated(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition("order", (remote("authorize", rec), local("reserve", rec, fail=True)))
    saga_id = await start(container, store, definition)
    runner = runner_for(container, store, definition, clock)
    while (saga := await store.get(saga_id)) is not None and not saga.status.terminal:
        await runner.run_once()
    assert saga is not None
    assert saga.status is SagaStatus.COMPENSATED
    assert await effect(container, saga_id, "reserve") is None  # rolled back with the failure
    assert ("reserve", "undo") not in rec.calls
    assert rec.calls[("authorize", "undo")] == 1


async def test_a_compensation_that_keeps_failing_marks_the_saga_failed(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition(
        "order", (remote("authorize", rec, undo_fails=True), remote("ship", rec, reject=True))
    )
    saga_id = await start(container, store, definition)
    runner = runner_for(container, store, definition, clock)
    while (saga := await store.get(saga_id)) is not None and not saga.status.terminal:
        await runner.run_once()
    assert saga is not None
    assert saga.status is SagaStatus.FAILED
    assert [s.id for s in await store.find(status=SagaStatus.FAILED)] == [saga_id]


async def test_a_saga_past_its_deadline_compensates(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition("order", (remote("authorize", rec), remote("ship", rec)), deadline_s=5)
    saga_id = await start(container, store, definition)
    clock.advance(6)
    await runner_for(container, store, definition, clock).run_once()
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPENSATED
    assert rec.calls == Counter()
    assert saga.failure == "saga deadline exceeded"


async def test_a_crashed_runner_is_resumed_by_another_after_its_lease_expires(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition("order", (remote("authorize", rec, hang=True), remote("ship", rec)))
    saga_id = await start(container, store, definition)
    crashed = asyncio.create_task(runner_for(container, store, definition, clock, "runner-a").run_once())
    await asyncio.wait_for(rec.first_call.wait(), timeout=5)
    crashed.cancel()  # the process died mid-call
    with pytest.raises(asyncio.CancelledError):
        await crashed
    healthy = SagaDefinition("order", (remote("authorize", rec), remote("ship", rec)))
    survivor = runner_for(container, store, healthy, clock, "runner-b")
    assert await survivor.run_once() == 0  # still leased to runner-a
    clock.advance(11)
    assert await survivor.run_once() == 1
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED
    assert len({k for k in rec.keys if k.endswith(":authorize")}) == 1


async def test_a_stale_runner_cannot_write_after_a_takeover(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    definition = SagaDefinition("order", (local("reserve", rec),))
    saga_id = await start(container, store, definition)
    token_a = await store.claim(saga_id, owner="runner-a", lease_s=10)
    assert token_a is not None
    clock.advance(11)  # runner-a stalls past its lease
    token_b = await store.claim(saga_id, owner="runner-b", lease_s=10)
    assert token_b is not None
    assert token_b > token_a

    async def stale_local_step() -> None:
        async with container.db.write() as conn:
            await set_meta(conn, f"effect:{saga_id}:stale", "written", now=await _now(conn))
            await store.fenced_update(conn, saga_id, token_a, step_index=1)

    with pytest.raises(LeaseLost):
        await stale_local_step()
    # The stale runner's local effect rolled back with its refused state write.
    assert await effect(container, saga_id, "stale") is None


async def lost_lease(
    container: Container, store: SagaStore, clock: ManualClock
) -> tuple[uuid.UUID, SagaInstance]:
    """A one-step saga claimed by runner-a, whose lease runner-b took after it expired: runner-a's
    view (`stale`) may still try to move it."""
    definition = SagaDefinition("order", (local("reserve", Recorder()),))
    saga_id = await start(container, store, definition)
    stale = await store.claim_instance(saga_id, owner="runner-a", lease_s=10)
    assert stale is not None
    clock.advance(11)
    assert await store.claim(saga_id, owner="runner-b", lease_s=10) is not None
    return saga_id, stale


async def test_a_stale_move_writes_neither_the_state_nor_its_step_record(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    saga_id, stale = await lost_lease(container, store, clock)
    # The move and its record are one statement on PostgreSQL (the record is inserted from the
    # fenced UPDATE's RETURNING) and two on SQLite (the INSERT only after the UPDATE matched).
    record = StepOutcome("reserve", "forward", 1, "succeeded", 3)
    with pytest.raises(LeaseLost):
        async with container.db.write() as conn:
            await store.move(conn, replace(stale, step_index=1), record)
    assert await store.history(saga_id) == []
    current = await store.get(saga_id)
    assert current is not None
    assert current.step_index == 0
    # The current term's move writes both.
    claimed = await store.claim_instance(saga_id, owner="runner-b", lease_s=10)
    assert claimed is None  # still held by runner-b's term
    clock.advance(11)
    fresh = await store.claim_instance(saga_id, owner="runner-c", lease_s=10)
    assert fresh is not None
    async with container.db.write() as conn:
        await store.move(conn, replace(fresh, step_index=1, data={"order": "o-1", "moved": True}), record)
    [step] = await store.history(saga_id)
    assert (step.step, step.outcome, step.attempt, step.duration_ms) == ("reserve", "succeeded", 1, 3)
    moved = await store.get(saga_id)
    assert moved is not None
    assert (moved.step_index, moved.data["moved"]) == (1, True)


async def test_two_runners_never_run_a_step_twice(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    # Timeouts that only bound the test: a CI machine that stalled past the usual 1 s / 0.2 s timed a
    # step out, and its retry (due, but claimed by no later pass here) left the saga running.
    steps = (local("reserve", rec, timeout_s=8.0), remote("authorize", rec, timeout_s=5.0))
    definition = SagaDefinition("order", steps)
    ids = [await start(container, store, definition) for _ in range(12)]
    a = runner_for(container, store, definition, clock, "runner-a")
    b = runner_for(container, store, definition, clock, "runner-b")
    await asyncio.gather(a.run_once(), b.run_once(), a.run_once(), b.run_once())
    statuses = [s.status for i in ids if (s := await store.get(i)) is not None]
    assert statuses == [SagaStatus.COMPLETED] * 12
    assert rec.calls[("reserve", "do")] == 12
    assert rec.calls[("authorize", "do")] == 12


def saga_statements(tally: Tally) -> list[str]:
    return [sql for sql in tally.statements if "saga_instances" in sql or "saga_steps" in sql]


def move_verbs(container: Container) -> list[str]:
    """A move and its step record: one statement on PostgreSQL (the record inserted from the fenced
    UPDATE's RETURNING, in a data-modifying CTE), the UPDATE then the INSERT on SQLite."""
    return ["WITH"] if container.db.dialect == "postgresql" else ["UPDATE", "INSERT"]


def claim_transactions(container: Container) -> int:
    """The claim commits on its own: no transaction on PostgreSQL, SQLite's one writer still begins."""
    return 0 if container.db.dialect == "postgresql" else 1


async def test_one_transaction_per_move_and_no_read_back_between_moves(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec, sink = Recorder(), ListSink()
    definition = SagaDefinition(
        "order", (local("reserve", rec), remote("authorize", rec), remote("ship", rec))
    )
    saga_id = await start(container, store, definition)
    runner = runner_for(container, store, definition, clock, sink=sink)
    with counting(container) as counted:
        assert await runner.run_once() == 1
    # The claim (which returns the row, committed on its own), then one write per step; the last
    # one also finishes the saga, and the lease (10 s) outlives each remote step (0.2 s), so no
    # renewal of its own. Each write is the move (one UPDATE of the whole state) with its step
    # record, every one a prepared statement on the raw-driver layer.
    assert counted.transactions == claim_transactions(container) + 3, counted.report()
    ours = saga_statements(counted)
    assert verbs_of(ours) == ["WITH"] + move_verbs(container) * 3, counted.report()
    assert all(sql.startswith("driver: ") for sql in ours), counted.report()
    assert not [s for s in counted.statements if "SELECT" in s.split(None, 2)[:2]]
    saga = await store.get(saga_id)
    assert saga is not None
    assert (saga.status, saga.step_index, saga.lease_expires_at) == (SagaStatus.COMPLETED, 3, None)
    assert saga.data["ship_ref"] == "ref-ship"
    assert [h.step for h in await store.history(saga_id)] == ["reserve", "authorize", "ship"]


async def test_a_remote_step_without_events_commits_its_move_on_its_own(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()

    async def quiet(_ctx: StepContext) -> Mapping[str, Any]:
        return {"quiet_ref": "q"}  # no event: its outcome is the move alone

    steps = (local("reserve", rec), Step("quiet", quiet, timeout_s=0.2), remote("ship", rec))
    definition = SagaDefinition("order", steps)
    saga_id = await start(container, store, definition)
    runner = runner_for(container, store, definition, clock, sink=ListSink())
    with counting(container) as counted:
        assert await runner.run_once() == 1
    # claim and the quiet step's move commit on their own (no BEGIN/COMMIT on PostgreSQL); reserve
    # and ship (events, and the finish) are write transactions.
    assert counted.transactions == 2 * claim_transactions(container) + 2, counted.report()
    saga = await store.get(saga_id)
    assert saga is not None
    assert (saga.status, saga.data["quiet_ref"]) == (SagaStatus.COMPLETED, "q")
    assert [h.step for h in await store.history(saga_id)] == ["reserve", "quiet", "ship"]


async def test_a_lease_shorter_than_a_remote_step_is_renewed_before_it(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    slow = replace(remote("authorize", rec), timeout_s=30.0)
    definition = SagaDefinition("order", (local("reserve", rec), slow))
    saga_id = await start(container, store, definition)
    runner = SagaRunner(container.db, store, {"order": definition}, clock, owner="a", lease_s=5)
    with counting(container) as counted:
        assert await runner.run_once() == 1
    # claim and renewal (each committed on its own), reserve, authorize + finish
    assert counted.transactions == 2 * claim_transactions(container) + 1 + 1, counted.report()
    moves = move_verbs(container)
    assert verbs_of(saga_statements(counted)) == ["WITH", *moves, "UPDATE", *moves], counted.report()
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED


async def outbox_types(container: Container) -> list[str]:
    async with container.db.read() as conn:
        return [row.type for row in await conn.execute(select(outbox).order_by(outbox.c.id))]


async def test_a_remote_steps_events_ride_in_its_move_which_commits_on_its_own(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    rec = Recorder()
    sink = OutboxEventSink(container.outbox, source="test", clock=clock)
    definition = SagaDefinition(
        "order", (local("reserve", rec), remote("authorize", rec), remote("ship", rec))
    )
    saga_id = await start(container, store, definition)
    runner = runner_for(container, store, definition, clock, sink=sink)
    with counting(container) as counted:
        assert await runner.run_once() == 1
    # authorize emits an event and does not finish the saga: its move, step record and outbox row
    # are one statement on PostgreSQL (the inserts fed by the fenced UPDATE's RETURNING), committed
    # on its own; in turn in one write transaction on SQLite. reserve (local) and ship (finishes)
    # stay write transactions.
    postgresql = container.db.dialect == "postgresql"
    assert counted.transactions == 2 * claim_transactions(container) + 2, counted.report()
    ours = [s for s in counted.statements if "saga_" in s or "messaging_outbox" in s]
    with_event = ["WITH"] if postgresql else ["UPDATE", "INSERT", "INSERT"]
    assert verbs_of(ours) == ["WITH", *move_verbs(container), *with_event, *with_event], counted.report()
    assert all(sql.startswith("driver: ") for sql in ours), counted.report()
    assert await outbox_types(container) == ["authorize_done", "ship_done"]
    saga = await store.get(saga_id)
    assert saga is not None
    assert saga.status is SagaStatus.COMPLETED
    assert [h.step for h in await store.history(saga_id)] == ["reserve", "authorize", "ship"]


async def test_a_stale_move_writes_none_of_its_events(
    container: Container, store: SagaStore, clock: ManualClock
) -> None:
    saga_id, stale = await lost_lease(container, store, clock)
    sink = OutboxEventSink(container.outbox, source="test", clock=clock)
    event = {"type": "mercato.test.reserved", "saga_id": str(saga_id), "data": {"order_id": "o-1"}}
    record = StepOutcome("reserve", "forward", 1, "succeeded", 3)
    with pytest.raises(LeaseLost):
        async with container.db.autocommit() as conn:
            await store.move(conn, replace(stale, step_index=1), record, sink.stage(conn, [event, event]))
    assert await outbox_types(container) == []
    assert await store.history(saga_id) == []
    # The current term's move writes the state, its record and both messages.
    clock.advance(11)
    fresh = await store.claim_instance(saga_id, owner="runner-c", lease_s=10)
    assert fresh is not None
    async with container.db.autocommit() as conn:
        await store.move(conn, replace(fresh, step_index=1), record, sink.stage(conn, [event, event]))
    assert await outbox_types(container) == ["mercato.test.reserved"] * 2
    assert [h.step for h in await store.history(saga_id)] == ["reserve"]
