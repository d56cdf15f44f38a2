"""Drives sagas: forward through their steps, backward through compensations, after any crash.

Each pass claims due sagas (a new lease term each), and drives each until it finishes, waits
for a retry, or loses its lease. Every state change is a fenced write; a local step's action runs
inside that same transaction, so its effects, the saga's progress and its events commit or roll
back together.

Failure rules (guide §2, "Resilient Payment Workflow"):
- `StepRejected` — definite, no effect: compensate the steps *before* it.
- any other error or a timeout — uncertain: retry with full-jitter backoff up to the step's
  attempts; then compensate the steps before it *and the step itself* (a remote call may have
  taken effect though its answer was lost), except for local steps, whose failed transaction
  rolled their effects back.
- a compensation is retried on its own, longer schedule; if it still fails the saga is `failed`
  and needs attention (listed by `SagaStore.find(status=FAILED)`).
- a saga past its deadline stops moving forward and compensates.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.coordination import LeaseLost
from mercato.kit.observability import get_logger
from mercato.kit.sagas.definition import EventSink, SagaDefinition, Step, StepContext, StepRejected
from mercato.kit.sagas.store import SagaInstance, SagaStatus, SagaStore
from mercato.kit.storage import Database

_log = get_logger("mercato.sagas")


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
    ) -> None:
        self._db = db
        self._store = store
        self._definitions = dict(definitions)
        self._clock = clock
        self._owner = owner
        self._events = events
        self._lease_s = lease_s
        self._concurrency = concurrency
        self._poll_s = poll_s
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._driving: set[uuid.UUID] = set()

    def wake(self) -> None:
        """Look for work now (call after committing a new saga in this process)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Drive sagas until `stop` is set; idle passes wait `poll_s` or until woken."""
        while not stop.is_set():
            try:
                handled = await self.run_once()
            except Exception:  # noqa: BLE001 - the runner outlives a failed pass (e.g. DB restart)
                _log.exception("saga_pass_failed")
                handled = 0
            if handled:
                continue
            self._wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=self._poll_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def run_once(self) -> int:
        """Claim due sagas (up to the concurrency bound) and drive them; returns how many."""
        due = [i for i in await self._store.due(limit=self._concurrency) if i not in self._driving]
        if not due:
            return 0
        results = await asyncio.gather(*(self.drive(saga_id) for saga_id in due))
        return sum(results)

    async def drive(self, saga_id: uuid.UUID) -> int:
        """Claim one saga and drive it as far as it goes now; 1 if it was claimed, else 0."""
        if saga_id in self._driving:
            return 0
        token = await self._store.claim(saga_id, owner=self._owner, lease_s=self._lease_s)
        if token is None:
            return 0
        self._driving.add(saga_id)
        try:
            while await self._advance(saga_id, token):
                pass
        except LeaseLost:
            _log.warning("saga_lease_lost", saga_id=str(saga_id), token=token)
        finally:
            self._driving.discard(saga_id)
        return 1

    async def _advance(self, saga_id: uuid.UUID, token: int) -> bool:
        """One move; False when the saga is finished or parked until a retry is due."""
        saga = await self._store.get(saga_id)
        if saga is None or saga.status.terminal or saga.lease_token != token:
            return False
        definition = self._definitions[saga.saga_type]
        if saga.status is SagaStatus.RUNNING:
            # Every step done (the last one committed, then the runner died or the pass ended before
            # finishing): the saga completed, whatever the clock says. Checking the deadline first
            # would "compensate" a completed order: refund it, cancel its shipment, and fail on the
            # reservation it already committed.
            if saga.step_index >= len(definition.steps):
                await self._finish(saga, token, definition, SagaStatus.COMPLETED)
                return False
            if self._clock.now() >= saga.deadline_at:
                # The step due next may already have taken effect: a remote call whose answer was
                # lost (its retry parked: attempt > 0) or one cut off by a crashed runner (a later
                # lease term: token > 1). Then, like a remote step out of attempts, it is compensated
                # too (its compensation asks the provider what exists); a local step rolled back.
                step = definition.steps[saga.step_index]
                may_have_run = not step.local and (saga.attempt > 0 or token > 1)
                start_from = saga.step_index if may_have_run else saga.step_index - 1
                await self._begin_compensation(saga, token, start_from, "saga deadline exceeded")
                return True
            return await self._forward(saga, token, definition.steps[saga.step_index])
        if saga.step_index < 0:
            await self._finish(saga, token, definition, SagaStatus.COMPENSATED)
            return False
        return await self._compensate(saga, token, definition.steps[saga.step_index])

    def _context(self, saga: SagaInstance, step: Step, attempt: int) -> StepContext:
        return StepContext(
            saga_id=saga.id,
            saga_type=saga.saga_type,
            correlation_id=saga.correlation_id,
            step=step.name,
            attempt=attempt,
            data=dict(saga.data),
        )

    async def _forward(self, saga: SagaInstance, token: int, step: Step) -> bool:
        attempt = saga.attempt + 1
        ctx = self._context(saga, step, attempt)
        started = time.perf_counter()
        try:
            if step.local:
                async with self._db.write() as conn:
                    ctx.conn = conn
                    result = await asyncio.wait_for(step.action(ctx), timeout=step.timeout_s)
                    await self._record_success(
                        conn,
                        saga,
                        token,
                        step,
                        ctx,
                        result,
                        "forward",
                        started,
                        next_index=saga.step_index + 1,
                    )
            else:
                await self._store.renew(saga.id, token, lease_s=self._lease_s)
                result = await asyncio.wait_for(step.action(ctx), timeout=step.timeout_s)
                async with self._db.write() as conn:
                    await self._record_success(
                        conn,
                        saga,
                        token,
                        step,
                        ctx,
                        result,
                        "forward",
                        started,
                        next_index=saga.step_index + 1,
                    )
        except LeaseLost:
            raise
        except StepRejected as exc:
            await self._record_failure(saga, token, step, "forward", attempt, "rejected", exc, started)
            await self._begin_compensation(saga, token, saga.step_index - 1, f"{step.name}: {exc}")
            return True
        except Exception as exc:  # noqa: BLE001 - any other failure is uncertain: retry, then undo
            outcome = "timed_out" if isinstance(exc, TimeoutError) else "failed"
            await self._record_failure(saga, token, step, "forward", attempt, outcome, exc, started)
            if attempt < step.retry.max_attempts:
                await self._park(saga, token, attempt, step.retry.delay_s(attempt, self._rng))
                return False
            # A failed local step rolled back; a remote one may have happened: undo it too.
            start_from = saga.step_index - 1 if step.local else saga.step_index
            await self._begin_compensation(
                saga, token, start_from, f"{step.name} failed after {attempt} attempts: {_describe(exc)}"
            )
        return True

    async def _compensate(self, saga: SagaInstance, token: int, step: Step) -> bool:
        if step.compensation is None:
            async with self._db.write() as conn:
                await self._store.fenced_update(
                    conn, saga.id, token, step_index=saga.step_index - 1, attempt=0
                )
            return True
        compensation = step.compensation
        attempt = saga.attempt + 1
        ctx = self._context(saga, step, attempt)
        started = time.perf_counter()
        try:
            if step.local:
                async with self._db.write() as conn:
                    ctx.conn = conn
                    await asyncio.wait_for(compensation(ctx), timeout=step.timeout_s)
                    await self._record_success(
                        conn,
                        saga,
                        token,
                        step,
                        ctx,
                        None,
                        "compensate",
                        started,
                        next_index=saga.step_index - 1,
                    )
            else:
                await self._store.renew(saga.id, token, lease_s=self._lease_s)
                await asyncio.wait_for(compensation(ctx), timeout=step.timeout_s)
                async with self._db.write() as conn:
                    await self._record_success(
                        conn,
                        saga,
                        token,
                        step,
                        ctx,
                        None,
                        "compensate",
                        started,
                        next_index=saga.step_index - 1,
                    )
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - compensations are retried until they succeed
            outcome = "timed_out" if isinstance(exc, TimeoutError) else "failed"
            await self._record_failure(saga, token, step, "compensate", attempt, outcome, exc, started)
            if attempt < step.compensation_retry.max_attempts:
                await self._park(saga, token, attempt, step.compensation_retry.delay_s(attempt, self._rng))
                return False
            async with self._db.write() as conn:
                await self._store.fenced_update(
                    conn,
                    saga.id,
                    token,
                    status=SagaStatus.FAILED.value,
                    failure=f"compensation {step.name} failed after {attempt} attempts: {_describe(exc)}",
                    finished_at=self._clock.now(),
                    lease_expires_at=None,
                )
            _log.error("saga_needs_attention", saga_id=str(saga.id), step=step.name)
            return False
        return True

    async def _record_success(
        self,
        conn: AsyncConnection,
        saga: SagaInstance,
        token: int,
        step: Step,
        ctx: StepContext,
        result: Mapping[str, Any] | None,
        direction: str,
        started: float,
        *,
        next_index: int,
    ) -> None:
        data = {**saga.data, **(dict(result) if result else {})}
        await self._store.fenced_update(conn, saga.id, token, step_index=next_index, attempt=0, data=data)
        await self._store.record_step(
            conn,
            saga.id,
            step=step.name,
            direction=direction,
            attempt=ctx.attempt,
            outcome="succeeded",
            duration_ms=_elapsed_ms(started),
        )
        if ctx.events and self._events is not None:
            await self._events.add(conn, ctx.events)

    async def _record_failure(
        self,
        saga: SagaInstance,
        token: int,
        step: Step,
        direction: str,
        attempt: int,
        outcome: str,
        exc: BaseException,
        started: float,
    ) -> None:
        async with self._db.write() as conn:
            await self._store.fenced_update(conn, saga.id, token, attempt=attempt)
            await self._store.record_step(
                conn,
                saga.id,
                step=step.name,
                direction=direction,
                attempt=attempt,
                outcome=outcome,
                error=_describe(exc),
                duration_ms=_elapsed_ms(started),
            )

    async def _park(self, saga: SagaInstance, token: int, attempt: int, delay_s: float) -> None:
        """Wait for the retry outside any lease: whichever runner is free when it is due takes it."""
        now = self._clock.now()
        async with self._db.write() as conn:
            await self._store.fenced_update(
                conn,
                saga.id,
                token,
                attempt=attempt,
                next_attempt_at=now + timedelta(seconds=delay_s),
                lease_expires_at=now,
            )

    async def _begin_compensation(self, saga: SagaInstance, token: int, from_index: int, why: str) -> None:
        async with self._db.write() as conn:
            await self._store.fenced_update(
                conn,
                saga.id,
                token,
                status=SagaStatus.COMPENSATING.value,
                step_index=from_index,
                attempt=0,
                failure=why[:2000],
            )
        _log.info("saga_compensating", saga_id=str(saga.id), reason=why)

    async def _finish(
        self, saga: SagaInstance, token: int, definition: SagaDefinition, status: SagaStatus
    ) -> None:
        hook = definition.on_completed if status is SagaStatus.COMPLETED else definition.on_compensated
        async with self._db.write() as conn:
            if hook is not None:
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
            await self._store.fenced_update(
                conn,
                saga.id,
                token,
                status=status.value,
                finished_at=self._clock.now(),
                lease_expires_at=None,
            )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
