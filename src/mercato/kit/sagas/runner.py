"""Drives sagas: forward through their steps, backward through compensations, after any crash.

The runner claims due sagas (a new lease term each, one `UPDATE … RETURNING` for the whole batch)
and drives each until it finishes, waits for a retry, or loses its lease, keeping up to
`concurrency` sagas in flight: a slot freed by one saga is refilled at once, not at the end of a
batch. Every state change is a fenced write; a local step's action runs inside that same
transaction, so its effects, the saga's progress and its events commit or roll back together.

Costs, per move: one transaction. The claim returns the rows, and the runner keeps the saga's state
from its own committed writes instead of reading it back before each move: only the lease holder
writes a saga, and any write of a stale term matches no row and raises `LeaseLost`. Every progress
write also extends the lease, so a remote step renews it in a transaction of its own only when the
remaining term would not cover the step's timeout. The last step's write also finishes the saga, and
a failure's record and what follows it (park, compensate, give up) are one write.

Failure rules (guide §2, "Resilient Payment Workflow"):
- `StepRejected` — definite, no effect: compensate the steps *before* it.
- any other error or a timeout — uncertain: retry with full-jitter backoff up to the step's
  attempts; then compensate the steps before it *and the step itself* (a remote call may have
  taken effect though its answer was lost), except for local steps, whose failed transaction
  rolled their effects back.
- a compensation is retried on its own, longer schedule; if it still fails the saga is `failed`
  and needs attention (listed by `SagaStore.find(status=FAILED)`). One refused by an open circuit
  breaker (`CircuitOpen`: nothing was sent) spends no attempt and waits for the breaker instead.
- a saga past its deadline stops moving forward and compensates; a forward retry is never parked
  past the deadline, and runners claim due sagas earliest deadline first (`SagaStore.claim_due`).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

from opentelemetry.trace import Status, StatusCode
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.coordination import LeaseLost
from mercato.kit.messaging import MAX_STAGED_ROWS, StagedRows
from mercato.kit.observability import context_from, get_logger, tracer
from mercato.kit.resilience import CircuitOpen
from mercato.kit.sagas.definition import (
    EventSink,
    SagaDefinition,
    StagingEventSink,
    Step,
    StepContext,
    StepRejected,
)
from mercato.kit.sagas.metrics import NullSagaHook, SagaHook
from mercato.kit.sagas.store import TRACE_KEY, SagaInstance, SagaStatus, SagaStore, StepOutcome
from mercato.kit.sagas.wakeups import SagaWakeups
from mercato.kit.storage import Database

_log = get_logger("mercato.sagas")

# A remote step starts only if the lease outlives its timeout by this much: room to write its result
# before another runner may take the saga over.
LEASE_MARGIN_S = 1.0
# A compensation refused by an open breaker retries once the breaker admits calls, spread over this
# much so the sagas parked on one breaker do not all meet its few half-open probes at once.
REFUSAL_JITTER_S = 1.0
# A parked saga's own runner wakes this long after its retry is due (clock granularity).
RETRY_WAKE_MARGIN_S = 0.005


class SagaRunner:
    def __init__(
        self,
        db: Database,
        store: SagaStore,
        definitions: Mapping[str, SagaDefinition],
        clock: Clock,
        *,
        owner: str,
        events: EventSink | None = None,
        lease_s: float = 30.0,
        concurrency: int = 32,
        poll_s: float = 0.2,
        rng: random.Random | None = None,
        wakeups: SagaWakeups | None = None,
        hook: SagaHook | None = None,
    ) -> None:
        self._db = db
        self._hook: SagaHook = hook or NullSagaHook()
        self._store = store
        self._definitions = dict(definitions)
        self._clock = clock
        self._owner = owner
        self._events = events
        self._lease_s = lease_s
        self._concurrency = concurrency
        self._poll_s = poll_s
        self._rng = rng or random.Random()
        self._wakeups = wakeups
        # Whether a step's events can be written by its move's own statement (ADR 0072).
        self._events_ride_with_moves = isinstance(events, StagingEventSink)
        self._wake = asyncio.Event()
        self._driving: set[uuid.UUID] = set()

    def wake(self) -> None:
        """Look for work now (call after committing a new saga in this process)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Drive sagas until `stop` is set, up to `concurrency` at a time; idle, wait `poll_s` or a wake.

        On stop, no new saga is claimed and the ones in flight are driven to their next pause. With
        `wakeups`, sagas started by other processes wake it too.
        """
        tasks: set[asyncio.Task[None]] = set()
        listener = (
            None
            if self._wakeups is None
            else asyncio.create_task(self._wakeups.listen(self.wake, stop), name="saga-wakeups")
        )

        # Whether the last claim filled every free slot (or there were none): more sagas may then be
        # due than were claimed, and each slot that opens must look for them at once. Waking only when
        # the runner drops below full left the slots freed after that first one idle until a new saga's
        # wake-up or the safety poll: under a backlog that stopped arriving (a burst, then quiet) the
        # runner sat empty for a whole poll interval with hundreds of sagas due.
        backlog = True

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if backlog:
                self._wake.set()  # wakes coalesce: one claim serves every slot freed meanwhile

        try:
            while not stop.is_set():
                # Cleared before claiming, so a wake during the claim is not lost.
                self._wake.clear()
                free = self._concurrency - len(tasks)
                claimed: list[SagaInstance] = []
                if free > 0:
                    try:
                        claimed = await self._store.claim_due(
                            owner=self._owner, lease_s=self._lease_s, limit=free
                        )
                    except Exception:  # noqa: BLE001 - the runner outlives a failed pass (DB restart)
                        _log.exception("saga_pass_failed")
                backlog = len(claimed) >= free
                for saga in claimed:
                    task = asyncio.create_task(self._drive_logged(saga), name=f"saga:{saga.id}")
                    tasks.add(task)
                    task.add_done_callback(finished)
                # Idle until a wake (a new saga here, a slot freed after a full claim) or the poll.
                await self._idle(stop)
        finally:
            if listener is not None:
                listener.cancel()
            await asyncio.gather(*tasks, *([listener] if listener else []), return_exceptions=True)

    async def _idle(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=self._poll_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def run_once(self) -> int:
        """Claim due sagas (up to the concurrency bound) and drive them; returns how many."""
        free = self._concurrency - len(self._driving)
        if free <= 0:
            return 0
        claimed = await self._store.claim_due(owner=self._owner, lease_s=self._lease_s, limit=free)
        await asyncio.gather(*(self._drive_claimed(saga) for saga in claimed))
        return len(claimed)

    async def drive(self, saga_id: uuid.UUID) -> int:
        """Claim one saga and drive it as far as it goes now; 1 if it was claimed, else 0."""
        if saga_id in self._driving:
            return 0
        saga = await self._store.claim_instance(saga_id, owner=self._owner, lease_s=self._lease_s)
        if saga is None:
            return 0
        await self._drive_claimed(saga)
        return 1

    async def _drive_claimed(self, saga: SagaInstance) -> None:
        self._driving.add(saga.id)
        try:
            current: SagaInstance | None = saga
            while current is not None:
                current = await self._advance(current)
        except LeaseLost:
            _log.warning("saga_lease_lost", saga_id=str(saga.id), token=saga.lease_token)
        finally:
            self._driving.discard(saga.id)

    async def _drive_logged(self, saga: SagaInstance) -> None:
        try:
            await self._drive_claimed(saga)
        except Exception:  # noqa: BLE001 - e.g. the database went away mid-move: the lease expires
            _log.exception("saga_move_failed", saga_id=str(saga.id))

    async def _advance(self, saga: SagaInstance) -> SagaInstance | None:
        """One move, in a span of the trace the saga was started in (its `_trace` data)."""
        if saga.status.terminal:
            return None
        parent = context_from(saga.data.get(TRACE_KEY))
        if parent is None:
            return await self._move(saga)
        steps = self._definitions[saga.saga_type].steps
        step = steps[saga.step_index].name if 0 <= saga.step_index < len(steps) else "finish"
        direction = "forward" if saga.status is SagaStatus.RUNNING else "compensate"
        with tracer().start_as_current_span(
            f"saga {saga.saga_type} {direction} {step}",
            context=parent,
            attributes={
                "saga.id": str(saga.id),
                "saga.type": saga.saga_type,
                "saga.step": step,
                "saga.direction": direction,
                "saga.attempt": saga.attempt + 1,
            },
            record_exception=True,
        ) as span:
            moved = await self._move(saga)
            if moved is not None and moved.status is SagaStatus.COMPENSATING:
                span.set_status(Status(StatusCode.ERROR, (moved.failure or "")[:200]))
            return moved

    async def _move(self, saga: SagaInstance) -> SagaInstance | None:
        """One move; the saga as it now stands, or None when it is finished or parked for a retry."""
        definition = self._definitions[saga.saga_type]
        if saga.status is SagaStatus.RUNNING:
            # Every step done (the last one committed, then the runner died or the pass ended before
            # finishing): the saga completed, whatever the clock says. Checking the deadline first
            # would "compensate" a completed order: refund it, cancel its shipment, and fail on the
            # reservation it already committed.
            if saga.step_index >= len(definition.steps):
                await self._finish(saga, definition, SagaStatus.COMPLETED)
                return None
            if self._clock.now() >= saga.deadline_at:
                # The step due next may already have taken effect: a remote call whose answer was
                # lost (its retry parked: attempt > 0) or one cut off by a crashed runner (a later
                # lease term: token > 1). Then, like a remote step out of attempts, it is compensated
                # too (its compensation asks the provider what exists); a local step rolled back.
                step = definition.steps[saga.step_index]
                may_have_run = not step.local and (saga.attempt > 0 or saga.lease_token > 1)
                start_from = saga.step_index if may_have_run else saga.step_index - 1
                async with self._db.write() as conn:
                    return await self._begin_compensation(conn, saga, start_from, "saga deadline exceeded")
            return await self._forward(saga, definition, definition.steps[saga.step_index])
        if saga.step_index < 0:
            await self._finish(saga, definition, SagaStatus.COMPENSATED)
            return None
        return await self._compensate(saga, definition, definition.steps[saga.step_index])

    def _progress(self, ctx: StepContext, *, finishing: bool) -> AbstractAsyncContextManager[AsyncConnection]:
        """Where a remote step's outcome is written. With no finish hook to run and no events, or
        events that ride in the move (`StagingEventSink`), the write is the move alone (with its step
        record and its events: one statement on PostgreSQL), which commits on its own (no
        BEGIN/COMMIT); otherwise a write transaction."""
        rides = self._events_ride_with_moves and len(ctx.events) <= MAX_STAGED_ROWS
        if finishing or (ctx.events and not rides):
            return self._db.write()
        return self._db.autocommit()

    def _context(self, saga: SagaInstance, step: Step, attempt: int) -> StepContext:
        return StepContext(
            saga_id=saga.id,
            saga_type=saga.saga_type,
            correlation_id=saga.correlation_id,
            step=step.name,
            attempt=attempt,
            data=dict(saga.data),
        )

    async def _write(
        self,
        conn: AsyncConnection,
        saga: SagaInstance,
        step: StepOutcome | None = None,
        messages: StagedRows | None = None,
        **values: Any,
    ) -> SagaInstance:
        """The fenced progress write, with the record of the step attempt that led to it and the
        events it emitted (one statement on PostgreSQL); it extends the lease unless told what the
        lease becomes."""
        now = self._clock.now()
        values.setdefault("updated_at", now)
        values.setdefault("lease_expires_at", now + timedelta(seconds=self._lease_s))
        moved = saga.with_values(values)
        await self._store.move(conn, moved, step, messages)
        return moved

    async def _hold_lease_for(self, saga: SagaInstance, step: Step) -> SagaInstance:
        """Make sure the lease outlasts the remote step about to run (renewing costs a transaction)."""
        needed = self._clock.now() + timedelta(seconds=step.timeout_s + LEASE_MARGIN_S)
        if saga.lease_expires_at is not None and saga.lease_expires_at >= needed:
            return saga
        expires_at = await self._store.renew(saga.id, saga.lease_token, lease_s=self._lease_s)
        return saga.with_values({"lease_expires_at": expires_at})

    async def _forward(
        self, saga: SagaInstance, definition: SagaDefinition, step: Step
    ) -> SagaInstance | None:
        attempt = saga.attempt + 1
        ctx = self._context(saga, step, attempt)
        started = time.perf_counter()
        next_index = saga.step_index + 1
        try:
            if step.local:
                async with self._db.write() as conn:
                    ctx.conn = conn
                    result = await asyncio.wait_for(step.action(ctx), timeout=step.timeout_s)
                    return await self._record_success(
                        conn, saga, definition, step, ctx, result, "forward", started, next_index=next_index
                    )
            saga = await self._hold_lease_for(saga, step)
            result = await asyncio.wait_for(step.action(ctx), timeout=step.timeout_s)
            async with self._progress(ctx, finishing=next_index >= len(definition.steps)) as conn:
                return await self._record_success(
                    conn, saga, definition, step, ctx, result, "forward", started, next_index=next_index
                )
        except LeaseLost:
            raise
        except StepRejected as exc:
            record = self._failed_step(saga, step, "forward", attempt, "rejected", exc, started)
            async with self._db.write() as conn:
                return await self._begin_compensation(
                    conn, saga, saga.step_index - 1, f"{step.name}: {exc}", record
                )
        except Exception as exc:  # noqa: BLE001 - any other failure is uncertain: retry, then undo
            outcome = "timed_out" if isinstance(exc, TimeoutError) else "failed"
            record = self._failed_step(saga, step, "forward", attempt, outcome, exc, started)
            async with self._db.write() as conn:
                if attempt < step.retry.max_attempts:
                    await self._park(conn, saga, attempt, step.retry.delay_s(attempt, self._rng), record)
                    return None
                # A failed local step rolled back; a remote one may have happened: undo it too.
                start_from = saga.step_index - 1 if step.local else saga.step_index
                why = f"{step.name} failed after {attempt} attempts: {_describe(exc)}"
                return await self._begin_compensation(conn, saga, start_from, why, record)

    async def _compensate(
        self, saga: SagaInstance, definition: SagaDefinition, step: Step
    ) -> SagaInstance | None:
        if step.compensation is None:
            async with self._db.write() as conn:
                return await self._write(conn, saga, step_index=saga.step_index - 1, attempt=0)
        compensation = step.compensation
        attempt = saga.attempt + 1
        ctx = self._context(saga, step, attempt)
        started = time.perf_counter()
        next_index = saga.step_index - 1
        try:
            if step.local:
                async with self._db.write() as conn:
                    ctx.conn = conn
                    await asyncio.wait_for(compensation(ctx), timeout=step.timeout_s)
                    return await self._record_success(
                        conn, saga, definition, step, ctx, None, "compensate", started, next_index=next_index
                    )
            saga = await self._hold_lease_for(saga, step)
            await asyncio.wait_for(compensation(ctx), timeout=step.timeout_s)
            async with self._progress(ctx, finishing=next_index < 0) as conn:
                return await self._record_success(
                    conn, saga, definition, step, ctx, None, "compensate", started, next_index=next_index
                )
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - compensations are retried until they succeed
            outcome = "timed_out" if isinstance(exc, TimeoutError) else "failed"
            record = self._failed_step(saga, step, "compensate", attempt, outcome, exc, started)
            async with self._db.write() as conn:
                if isinstance(exc, CircuitOpen):
                    # Refused before anything was sent: not an attempt. Counting it would spend the
                    # attempts that lead to `failed` and escalate the backoff while the breaker is
                    # open (seen in the chaos run: 12 refusals in a row, then waits of up to 10 s
                    # once the provider took calls again); wait for the breaker to admit calls.
                    delay_s = exc.retry_after_s + self._rng.uniform(0.0, REFUSAL_JITTER_S)
                    await self._park(conn, saga, saga.attempt, delay_s, record)
                    return None
                if attempt < step.compensation_retry.max_attempts:
                    delay_s = step.compensation_retry.delay_s(attempt, self._rng)
                    await self._park(conn, saga, attempt, delay_s, record)
                    return None
                await self._write(
                    conn,
                    saga,
                    record,
                    attempt=attempt,
                    status=SagaStatus.FAILED.value,
                    failure=f"compensation {step.name} failed after {attempt} attempts: {_describe(exc)}",
                    finished_at=self._clock.now(),
                    lease_expires_at=None,
                )
            self._finished(saga, SagaStatus.FAILED)
            _log.error("saga_needs_attention", saga_id=str(saga.id), step=step.name)
            return None

    async def _record_success(
        self,
        conn: AsyncConnection,
        saga: SagaInstance,
        definition: SagaDefinition,
        step: Step,
        ctx: StepContext,
        result: Mapping[str, Any] | None,
        direction: str,
        started: float,
        *,
        next_index: int,
    ) -> SagaInstance | None:
        """The step's outcome, its events and the saga's progress in one write; None once finished.

        The last step forward (or the first one undone) also finishes the saga in that transaction.
        """
        values: dict[str, Any] = {
            "step_index": next_index,
            "attempt": 0,
            "data": {**saga.data, **(dict(result) if result else {})},
        }
        done: SagaStatus | None = None
        if direction == "forward" and next_index >= len(definition.steps):
            done = SagaStatus.COMPLETED
        elif direction == "compensate" and next_index < 0:
            done = SagaStatus.COMPENSATED
        if done is not None:
            values.update(status=done.value, finished_at=self._clock.now(), lease_expires_at=None)
        record = StepOutcome(step.name, direction, ctx.attempt, "succeeded", _elapsed_ms(started))
        staged = None
        if ctx.events and isinstance(self._events, StagingEventSink):
            staged = self._events.stage(conn, ctx.events)
        saga = await self._write(conn, saga, record, staged, **values)
        self._hook.step(saga_type=saga.saga_type, step=step.name, direction=direction, outcome="succeeded")
        if ctx.events and self._events is not None and staged is None:
            await self._events.add(conn, ctx.events)
        if done is None:
            return saga
        await self._run_finish_hook(conn, saga, definition, done)
        self._finished(saga, done)
        return None

    def _failed_step(
        self,
        saga: SagaInstance,
        step: Step,
        direction: str,
        attempt: int,
        outcome: str,
        exc: BaseException,
        started: float,
    ) -> StepOutcome:
        """A failed attempt's record, written with the move that follows it (park, compensate, give up)."""
        self._hook.step(saga_type=saga.saga_type, step=step.name, direction=direction, outcome=outcome)
        return StepOutcome(step.name, direction, attempt, outcome, _elapsed_ms(started), _describe(exc))

    async def _park(
        self, conn: AsyncConnection, saga: SagaInstance, attempt: int, delay_s: float, record: StepOutcome
    ) -> None:
        """Wait for the retry outside any lease: whichever runner is free when it is due takes it.

        A forward retry is due at the deadline at the latest: past it the saga no longer retries
        but compensates, and waiting out the rest of a backoff would only delay that.
        """
        now = self._clock.now()
        due_at = now + timedelta(seconds=delay_s)
        if saga.status is SagaStatus.RUNNING:
            due_at = min(due_at, max(now, saga.deadline_at))
        await self._write(conn, saga, record, attempt=attempt, next_attempt_at=due_at, lease_expires_at=now)
        # This runner looks again when the retry falls due, not at its next (slow, safety) poll; a
        # little after, so the claim finds it due. Other runners find it by their poll.
        asyncio.get_running_loop().call_later(
            max((due_at - now).total_seconds(), 0.0) + RETRY_WAKE_MARGIN_S, self._wake.set
        )

    async def _begin_compensation(
        self,
        conn: AsyncConnection,
        saga: SagaInstance,
        from_index: int,
        why: str,
        record: StepOutcome | None = None,
    ) -> SagaInstance:
        saga = await self._write(
            conn,
            saga,
            record,
            status=SagaStatus.COMPENSATING.value,
            step_index=from_index,
            attempt=0,
            failure=why[:2000],
        )
        _log.info("saga_compensating", saga_id=str(saga.id), reason=why)
        return saga

    async def _finish(self, saga: SagaInstance, definition: SagaDefinition, status: SagaStatus) -> None:
        """Finish a saga whose last move committed without finishing it (a resumed saga)."""
        async with self._db.write() as conn:
            await self._run_finish_hook(conn, saga, definition, status)
            await self._write(
                conn, saga, status=status.value, finished_at=self._clock.now(), lease_expires_at=None
            )
        self._finished(saga, status)

    def _finished(self, saga: SagaInstance, status: SagaStatus) -> None:
        """Counted after the terminal write (a lost lease raises before it: not counted)."""
        duration_s = (self._clock.now() - saga.created_at).total_seconds()
        self._hook.finished(saga_type=saga.saga_type, status=status.value, duration_s=duration_s)

    async def _run_finish_hook(
        self, conn: AsyncConnection, saga: SagaInstance, definition: SagaDefinition, status: SagaStatus
    ) -> None:
        hook = definition.on_completed if status is SagaStatus.COMPLETED else definition.on_compensated
        if hook is None:
            return
        ctx = StepContext(
            saga_id=saga.id,
            saga_type=saga.saga_type,
            correlation_id=saga.correlation_id,
            step=status.value,
            attempt=1,
            data=dict(saga.data),
            conn=conn,
        )
        await hook(ctx)
        if ctx.events and self._events is not None:
            await self._events.add(conn, ctx.events)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
