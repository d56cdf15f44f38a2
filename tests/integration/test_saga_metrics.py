"""Saga metrics on both databases: step outcomes, terminal states and the time to them, stuck sagas;
and the worker's wiring (the runner and the watch job record on the container's registry)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.sagas import (
    PrometheusSagaHook,
    RetrySchedule,
    SagaDefinition,
    SagaRunner,
    SagaStatus,
    SagaStore,
    Step,
    StepContext,
    StepRejected,
)
from mercato.workers.jobs import SAGA_STUCK_GRACE_S, shop_jobs
from mercato.workers.sagas import build_saga_runner

NO_WAIT = RetrySchedule(max_attempts=2, base_s=0.0, cap_s=0.0)


def step(name: str, *, reject: bool = False, fail: bool = False, undo_fails: bool = False) -> Step:
    async def action(ctx: StepContext) -> Mapping[str, Any]:
        if reject:
            raise StepRejected(f"{name} declined")
        if fail:
            raise ConnectionError(f"{name} unavailable")
        return {}

    async def compensation(ctx: StepContext) -> None:
        if undo_fails:
            raise ConnectionError("cannot undo")

    return Step(name, action, compensation, timeout_s=1.0, retry=NO_WAIT, compensation_retry=NO_WAIT)


async def start(
    container: Container, store: SagaStore, saga_type: str, *, deadline_s: float = 60
) -> uuid.UUID:
    async with container.db.write() as conn:
        return await store.start(
            conn, saga_type=saga_type, data={}, correlation_id="corr", deadline_s=deadline_s
        )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


async def drain(runner: SagaRunner, store: SagaStore) -> None:
    for _ in range(20):
        await runner.run_once()
        if not [s for s in await store.find() if not s.status.terminal]:
            return
    raise AssertionError("sagas did not finish")


async def test_steps_terminal_states_and_time_to_them_are_counted(
    container: Container, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    hook = PrometheusSagaHook(registry)
    store = SagaStore(container.db, clock)
    definitions = {
        "good": SagaDefinition("good", (step("reserve"), step("pay"))),
        "declined": SagaDefinition("declined", (step("reserve"), step("pay", reject=True))),
        "stuck_undo": SagaDefinition(
            "stuck_undo", (step("reserve", undo_fails=True), step("pay", fail=True))
        ),
    }
    for saga_type in definitions:
        await start(container, store, saga_type)
    clock.advance(3)  # three seconds from start to terminal state
    runner = SagaRunner(container.db, store, definitions, clock, owner="a", lease_s=10, hook=hook)
    await drain(runner, store)

    finished = "mercato_saga_finished_total"
    assert value(registry, finished, saga_type="good", status="completed") == 1
    assert value(registry, finished, saga_type="declined", status="compensated") == 1
    assert value(registry, finished, saga_type="stuck_undo", status="failed") == 1
    assert value(registry, finished, saga_type="good", status="failed") == 0
    duration = "mercato_saga_duration_seconds"
    assert value(registry, f"{duration}_count", saga_type="good", status="completed") == 1
    assert value(registry, f"{duration}_sum", saga_type="good", status="completed") == 3.0
    assert value(registry, f"{duration}_bucket", saga_type="good", status="completed", le="2.5") == 0
    assert value(registry, f"{duration}_bucket", saga_type="good", status="completed", le="5.0") == 1

    attempts = "mercato_saga_step_attempts_total"

    def steps(saga_type: str, name: str, direction: str, outcome: str) -> float:
        return value(registry, attempts, saga_type=saga_type, step=name, direction=direction, outcome=outcome)

    assert steps("good", "pay", "forward", "succeeded") == 1
    assert steps("declined", "pay", "forward", "rejected") == 1
    assert steps("declined", "reserve", "compensate", "succeeded") == 1
    assert steps("stuck_undo", "pay", "forward", "failed") == 2  # both attempts
    assert steps("stuck_undo", "pay", "compensate", "succeeded") == 1  # may have happened: undone
    assert steps("stuck_undo", "reserve", "compensate", "failed") == 2  # then the saga is failed


async def test_stuck_sagas_are_those_long_past_their_deadline(
    container: Container, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    hook = PrometheusSagaHook(registry)
    store = SagaStore(container.db, clock)
    await start(container, store, "order", deadline_s=5)
    clock.advance(5 + SAGA_STUCK_GRACE_S - 1)
    assert await store.stuck_counts(grace_s=SAGA_STUCK_GRACE_S) == {}
    clock.advance(2)
    counts = await store.stuck_counts(grace_s=SAGA_STUCK_GRACE_S)
    assert counts == {("order", "running"): 1}
    hook.stuck(counts)
    assert value(registry, "mercato_saga_stuck", saga_type="order", status="running") == 1
    # Once a runner compensates it, it is no longer stuck, and the gauge says so.
    runner = SagaRunner(
        container.db, store, {"order": SagaDefinition("order", (step("pay"),))}, clock, owner="a"
    )
    await drain(runner, store)
    assert [s.status for s in await store.find()] == [SagaStatus.COMPENSATED]
    hook.stuck(await store.stuck_counts(grace_s=SAGA_STUCK_GRACE_S))
    assert value(registry, "mercato_saga_stuck", saga_type="order", status="running") == 0


async def test_the_worker_records_saga_metrics_on_the_registry_its_metrics_port_serves(
    container: Container, clock: ManualClock
) -> None:
    build_saga_runner(container)
    build_saga_runner(container)  # twice in one process (the embedded mode and a lab): one set of metrics
    (watch,) = [job for job in shop_jobs(container) if job.name == "watch_sagas"]
    await start(container, container.sagas, "order", deadline_s=1)
    clock.advance(SAGA_STUCK_GRACE_S + 2)
    await watch.run()
    exposed = generate_latest(container.metrics_registry).decode()
    assert 'mercato_saga_stuck{saga_type="order",status="running"} 1.0' in exposed
    # Every terminal state of every saga type is exported at 0 before any saga ends there.
    for status in ("completed", "compensated", "failed"):
        assert f'mercato_saga_finished_total{{saga_type="order_checkout",status="{status}"}} 0.0' in exposed
    assert "# TYPE mercato_saga_duration_seconds histogram" in exposed
