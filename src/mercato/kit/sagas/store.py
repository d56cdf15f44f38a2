"""Saga persistence: instances, their step history, claims with fencing tokens.

The runner's hot path is a handful of single statements: one `UPDATE … RETURNING` claims a batch of
due sagas and hands back their rows (no separate poll, claim and reload), and every progress write is
one fenced `UPDATE` that can also extend the lease, so renewing it costs no transaction of its own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Integer,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from mercato.kit.clock import Clock
from mercato.kit.coordination import LeaseLost
from mercato.kit.ids import new_id
from mercato.kit.messaging.outbox import OUTBOX_CHANNEL, StagedRows, insert_after, plain_insert
from mercato.kit.observability import trace_carrier
from mercato.kit.sagas.tables import saga_instances as saga_instances  # re-exported: moved from here
from mercato.kit.sagas.tables import saga_steps as saga_steps
from mercato.kit.sagas.wakeups import SagaWakeups
from mercato.kit.storage import Database, UTCDateTime
from mercato.kit.storage.signals import notify_statement
from mercato.kit.storage.statements import driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection

# The W3C trace context a saga was started in, kept in its data (`traceparent`, `tracestate`).
TRACE_KEY = "_trace"


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


ACTIVE = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)


def _is_active() -> ColumnElement[bool]:
    # Two equalities, not `status IN (...)`: an expanding IN is re-rendered on every execution and
    # its SQL text defeats asyncpg's prepared-statement cache; this one is compiled once. The values
    # are inline literals, not parameters, so both engines can tell that a query with this condition
    # may use the partial index over the active sagas (`tables.ACTIVE_SAGA_PREDICATE`).
    return or_(
        saga_instances.c.status == literal_column(f"'{SagaStatus.RUNNING.value}'"),
        saga_instances.c.status == literal_column(f"'{SagaStatus.COMPENSATING.value}'"),
    )


def _lease_free(now: Any) -> ColumnElement[bool]:
    return or_(saga_instances.c.lease_expires_at.is_(None), saga_instances.c.lease_expires_at <= now)


# Which due sagas a runner claims first. Not `next_attempt_at` alone: under a backlog (measured on
# SQLite, where the API and the worker share one write lock, the claim queue ran 45 s behind) a
# parked retry is due *after* every saga started before it came due, so each retry waited out the
# whole queue again, and a saga past its deadline waited for its compensation behind sagas that
# still had a minute to go: orders finished 100-130 s after they started against a 98 s bound.
_CLAIM_ORDER = (saga_instances.c.deadline_at, saga_instances.c.next_attempt_at)

# The per-step writes are built once and get their values as parameters: a statement built per call
# (`.values(...)` with literals) costs more client CPU in SQLAlchemy than its round trip.
_FENCED_UPDATE = update(saga_instances).where(
    saga_instances.c.id == bindparam("b_id"), saga_instances.c.lease_token == bindparam("b_token")
)
# A saga's start (`SagaStore.start`), on the raw-driver layer in the starter's transaction.
_START = driver_prepared(
    insert(saga_instances).values({c.name: bindparam(c.name, type_=c.type) for c in saga_instances.c})
)

# The runner's hot statements, on the raw-driver layer (`kit/storage/statements.py`): compiled once
# per dialect and sent on the driver connection under the caller's transaction.
#
# A move writes the saga's whole mutable state, as the runner holds it (`SagaInstance`): one
# statement whatever changed, fenced by the lease term; RETURNING tells whether the term held (a
# row count that both drivers give back the same way).
_MOVE_UPDATE = (
    update(saga_instances)
    .where(saga_instances.c.id == bindparam("b_id"), saga_instances.c.lease_token == bindparam("b_token"))
    .values(
        status=bindparam("status", type_=saga_instances.c.status.type),
        step_index=bindparam("step_index", type_=saga_instances.c.step_index.type),
        attempt=bindparam("attempt", type_=saga_instances.c.attempt.type),
        data=bindparam("data", type_=saga_instances.c.data.type),
        failure=bindparam("failure", type_=saga_instances.c.failure.type),
        lease_expires_at=bindparam("lease_expires_at", type_=saga_instances.c.lease_expires_at.type),
        next_attempt_at=bindparam("next_attempt_at", type_=saga_instances.c.next_attempt_at.type),
        updated_at=bindparam("updated_at", type_=saga_instances.c.updated_at.type),
        finished_at=bindparam("finished_at", type_=saga_instances.c.finished_at.type),
    )
    .returning(saga_instances.c.id)
)
_MOVE = driver_prepared(_MOVE_UPDATE)
# A step's record, with the move it leads to: the step's own values are `s_*` parameters.
_STEP_COLUMNS = ("id", "step", "direction", "attempt", "outcome", "error", "duration_ms", "recorded_at")
_STEP_VALUES = {name: bindparam(f"s_{name}", type_=saga_steps.c[name].type) for name in _STEP_COLUMNS}
_RECORD_STEP = insert(saga_steps).values(
    saga_id=bindparam("b_id", type_=saga_steps.c.saga_id.type), **_STEP_VALUES
)
_MOVED = _MOVE_UPDATE.cte("moved")
# One statement on PostgreSQL: the record is inserted from what the fenced UPDATE returned, so
# nothing is written when the term is lost; SQLite runs the UPDATE, then (if it matched) the INSERT.
_MOVE_AND_RECORD = driver_prepared(
    insert(saga_steps)
    .from_select(
        ["saga_id", *_STEP_COLUMNS],
        select(_MOVED.c.id, *(_STEP_VALUES[name] for name in _STEP_COLUMNS)),
    )
    .returning(saga_steps.c.saga_id)
    .add_cte(_MOVED),
    in_turn=(_MOVE, _RECORD_STEP),
)
# With the events the step emitted (`StagedRows`): on PostgreSQL the move, its step record and the
# outbox rows (and the relays' NOTIFY) in one statement, each insert fed by the fenced UPDATE's
# RETURNING, so a lost term writes none of them; SQLite runs them in turn. One per (rows, notify).
_MOVES_WITH_MESSAGES: dict[tuple[int, bool], Any] = {}


def _move_with_messages(count: int, *, notify: bool) -> Any:
    statement = _MOVES_WITH_MESSAGES.get((count, notify))
    if statement is None:
        moved = _MOVE_UPDATE.cte("moved")
        recorded = (
            insert(saga_steps)
            .from_select(
                ["saga_id", *_STEP_COLUMNS],
                select(moved.c.id, *(_STEP_VALUES[name] for name in _STEP_COLUMNS)),
            )
            .cte("recorded")
        )
        messages = insert_after(moved, count).cte("new_outbox_rows")
        final = select(moved.c.id)
        if notify:
            final = final.add_columns(*notify_statement(OUTBOX_CHANNEL).selected_columns)
        statement = _MOVES_WITH_MESSAGES[(count, notify)] = driver_prepared(
            final.add_cte(moved, recorded, messages),
            in_turn=(_MOVE, _RECORD_STEP, plain_insert(count)),
        )
    return statement


_RENEW = driver_prepared(
    update(saga_instances)
    .where(saga_instances.c.id == bindparam("b_id"), saga_instances.c.lease_token == bindparam("b_token"))
    .values(
        lease_expires_at=bindparam("lease_expires_at", type_=saga_instances.c.lease_expires_at.type),
        updated_at=bindparam("updated_at", type_=saga_instances.c.updated_at.type),
    )
    .returning(saga_instances.c.id)
)


@dataclass(frozen=True, slots=True)
class SagaInstance:
    id: uuid.UUID
    saga_type: str
    status: SagaStatus
    step_index: int
    attempt: int
    data: dict[str, Any]
    correlation_id: str
    failure: str | None
    lease_token: int
    next_attempt_at: datetime
    deadline_at: datetime
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    lease_expires_at: datetime | None = None

    def with_values(self, values: dict[str, Any]) -> SagaInstance:
        """This instance after a `fenced_update(**values)` succeeded: the row as now committed."""
        changes = {k: v for k, v in values.items() if k in _INSTANCE_FIELDS}
        if "status" in changes:
            changes["status"] = SagaStatus(changes["status"])
        return replace(self, **changes)


_INSTANCE_FIELDS = frozenset(SagaInstance.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class SagaStepRecord:
    step: str
    direction: str
    attempt: int
    outcome: str
    error: str | None
    duration_ms: int
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """One attempt of a step, recorded with the move it leads to (`SagaStore.move`)."""

    step: str
    direction: str
    attempt: int
    outcome: str
    duration_ms: int
    error: str | None = None


def _step_params(step: StepOutcome, recorded_at: datetime) -> dict[str, Any]:
    """A step record's `s_*` parameters (`_STEP_VALUES`)."""
    return {
        "s_id": new_id(),
        "s_step": step.step,
        "s_direction": step.direction,
        "s_attempt": step.attempt,
        "s_outcome": step.outcome,
        "s_error": (step.error or None) and step.error[:2000],
        "s_duration_ms": step.duration_ms,
        "s_recorded_at": recorded_at,
    }


def _instance(row: Any) -> SagaInstance:
    return SagaInstance(
        id=row.id,
        saga_type=row.saga_type,
        status=SagaStatus(row.status),
        step_index=row.step_index,
        attempt=row.attempt,
        data=dict(row.data or {}),
        correlation_id=row.correlation_id,
        failure=row.failure,
        lease_token=row.lease_token,
        next_attempt_at=row.next_attempt_at,
        deadline_at=row.deadline_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        lease_expires_at=row.lease_expires_at,
    )


_COLUMNS = tuple(c.name for c in saga_instances.c)


def _instance_of(row: tuple[Any, ...]) -> SagaInstance:
    """A SagaInstance from a driver-path row of every `saga_instances` column, in table order."""
    values = dict(zip(_COLUMNS, row, strict=True))
    values.pop("owner")
    values["status"] = SagaStatus(values["status"])
    values["data"] = dict(values["data"] or {})
    return SagaInstance(**values)


def _claiming(which: ColumnElement[bool]) -> Any:
    """A new lease term (`owner`, token + 1, until `expires`) on the active sagas `which` picks
    whose lease is free at `now`; every column of the claimed rows back."""
    return driver_prepared(
        update(saga_instances)
        .where(which, _is_active(), _lease_free(bindparam("now", type_=UTCDateTime())))
        .values(
            owner=bindparam("owner", type_=saga_instances.c.owner.type),
            lease_token=saga_instances.c.lease_token + 1,
            lease_expires_at=bindparam("expires", type_=saga_instances.c.lease_expires_at.type),
        )
        .returning(*saga_instances.c)
    )


_DUE = (
    select(saga_instances.c.id)
    .where(
        _is_active(),
        saga_instances.c.next_attempt_at <= bindparam("now", type_=UTCDateTime()),
        _lease_free(bindparam("now", type_=UTCDateTime())),
    )
    .order_by(*_CLAIM_ORDER)
    .limit(bindparam("limit", type_=Integer()))
    .with_for_update(skip_locked=True)
    .cte("due_sagas")
    .prefix_with("MATERIALIZED")
)
_CLAIM_DUE = _claiming(saga_instances.c.id.in_(select(_DUE.c.id)))
_CLAIM_ONE = _claiming(saga_instances.c.id == bindparam("b_id", type_=saga_instances.c.id.type))


_START_RETURNING = _START.returning(saga_instances.c.id)


class SagaStore:
    def __init__(self, db: Database, clock: Clock, *, wakeups: SagaWakeups | None = None) -> None:
        self._db = db
        self._clock = clock
        self._wakeups = wakeups
        announcing = None if wakeups is None else wakeups.announcing(_START)
        self._start: Any = _START if announcing is None else driver_prepared(announcing)
        self._announcement = None if wakeups is None else wakeups.announcement()
        self._starts_with: dict[tuple[int, bool, bool], Any] = {}

    def _start_with(self, count: int, *, notify: bool, record: bool) -> Any:
        """The saga's insert with `count` staged outbox rows (its start's events), the record of a
        step the starter did (`record`), and the wake-up and the relays' NOTIFY, as one statement on
        PostgreSQL; SQLite inserts them in turn. One per (rows, notify, record)."""
        statement = self._starts_with.get((count, notify, record))
        if statement is None:
            new_saga = _START_RETURNING.cte("new_saga")
            ctes: list[Any] = [new_saga]
            in_turn: list[Any] = [_START]
            if record:
                ctes.append(
                    insert(saga_steps)
                    .from_select(
                        ["saga_id", *_STEP_COLUMNS],
                        select(new_saga.c.id, *(_STEP_VALUES[name] for name in _STEP_COLUMNS)),
                    )
                    .cte("recorded")
                )
                in_turn.append(_RECORD_STEP)
            if count:
                ctes.append(insert_after(new_saga, count).cte("new_outbox_rows"))
                in_turn.append(plain_insert(count))
            final = select(new_saga.c.id)
            if self._announcement is not None:
                final = final.add_columns(*self._announcement.selected_columns)
            if notify:
                final = final.add_columns(*notify_statement(OUTBOX_CHANNEL).selected_columns)
            statement = self._starts_with[(count, notify, record)] = driver_prepared(
                final.add_cte(*ctes), in_turn=in_turn
            )
        return statement

    async def start(
        self,
        conn: AsyncConnection,
        *,
        saga_type: str,
        data: dict[str, Any],
        correlation_id: str,
        deadline_s: float,
        saga_id: uuid.UUID | None = None,
        completed_steps: int = 0,
        messages: StagedRows | None = None,
        done: StepOutcome | None = None,
    ) -> uuid.UUID:
        """Create a saga in the caller's transaction, so it exists iff the caller's change does.

        `completed_steps` counts steps the caller already did in this same transaction (the
        order saga's CreateOrder happens in the checkout request itself). With `wakeups`, runners
        in other processes hear of it when the transaction commits. `messages`: the start's events
        as staged outbox rows (`StagingEventSink.stage`), inserted by the same statement on
        PostgreSQL (was a statement of their own). `done`: the last of the completed steps, when the
        starter did it and its record belongs in the saga's history, written by the same statement.
        """
        now = self._clock.now()
        saga_id = saga_id or new_id()
        carrier = trace_carrier()
        if carrier:
            # The runner continues the starter's trace in whichever process drives the saga.
            data = {**data, TRACE_KEY: carrier}
        params = {
            "id": saga_id,
            "saga_type": saga_type,
            "status": SagaStatus.RUNNING.value,
            "step_index": completed_steps,
            "attempt": 0,
            "data": data,
            "correlation_id": correlation_id,
            "failure": None,
            "owner": None,
            "lease_token": 0,
            "lease_expires_at": None,
            "next_attempt_at": now,
            "deadline_at": now + timedelta(seconds=deadline_s),
            "created_at": now,
            "updated_at": now,
            "finished_at": None,
        }
        # With a wake-up channel that can ride in the insert itself (PostgreSQL's NOTIFY, delivered
        # at commit), one statement; otherwise the insert, then the channel's own announcement.
        statement = self._start
        if messages is not None or done is not None:
            statement = self._start_with(
                0 if messages is None else messages.count,
                notify=messages is not None and messages.notify,
                record=done is not None,
            )
        if messages is not None:
            params.update(messages.params)
        if done is not None:
            params.update(b_id=saga_id, **_step_params(done, now))
        await on_connection(conn).run(statement, params)
        if self._wakeups is not None and self._announcement is None:
            await self._wakeups.notify(conn)
        return saga_id

    async def due(self, *, limit: int) -> list[uuid.UUID]:
        """Active sagas whose next attempt is due and whose lease (if any) has expired, in the order
        a runner claims them (`claim_due`)."""
        now = self._clock.now()
        async with self._db.read() as conn:
            rows = await conn.execute(
                select(saga_instances.c.id)
                .where(_is_active(), saga_instances.c.next_attempt_at <= now, _lease_free(now))
                .order_by(*_CLAIM_ORDER)
                .limit(limit)
            )
            return [row.id for row in rows]

    async def claim_due(self, *, owner: str, lease_s: float, limit: int) -> list[SagaInstance]:
        """Start a lease term on up to `limit` due sagas in one statement; their rows as claimed.

        Earliest deadline first (then the longest due): when more sagas are due than the runners
        have room for, the ones nearest their deadline, or past it and waiting to be compensated,
        go first, and a saga whose retry comes due keeps the place its deadline gives it instead of
        queueing behind every saga started since (see `_CLAIM_ORDER`).

        `FOR UPDATE SKIP LOCKED` (PostgreSQL; SQLite has one writer and ignores it) lets several
        runners claim at once without waiting on each other's rows; the outer conditions are checked
        again on the locked rows, so a saga is never claimed twice in one term. The due rows are a
        materialized CTE: as a plain `IN (subquery)` PostgreSQL re-ran the locking subquery for each
        row it updated, and each run, no longer seeing the rows already claimed, found the next
        one, so the claim took every due saga whatever `limit` said.

        One statement, so it commits on its own (`Database.autocommit`: no BEGIN/COMMIT on
        PostgreSQL), prepared once on the driver path.
        """
        now = self._clock.now()
        params = {"now": now, "limit": limit, "owner": owner, "expires": now + timedelta(seconds=lease_s)}
        async with self._db.autocommit() as conn:
            rows = await on_connection(conn).rows(_CLAIM_DUE, params)
        claimed = [_instance_of(row) for row in rows]
        return sorted(claimed, key=lambda saga: (saga.deadline_at, saga.next_attempt_at))

    async def claim_instance(self, saga_id: uuid.UUID, *, owner: str, lease_s: float) -> SagaInstance | None:
        """Start a new lease term on one active saga; its row as claimed, or None if held/finished."""
        now = self._clock.now()
        params = {"now": now, "b_id": saga_id, "owner": owner, "expires": now + timedelta(seconds=lease_s)}
        async with self._db.autocommit() as conn:
            rows = await on_connection(conn).rows(_CLAIM_ONE, params)
        return _instance_of(rows[0]) if rows else None

    async def claim(self, saga_id: uuid.UUID, *, owner: str, lease_s: float) -> int | None:
        """Start a new lease term on an active saga; its fencing token, or None if held/finished."""
        saga = await self.claim_instance(saga_id, owner=owner, lease_s=lease_s)
        return None if saga is None else saga.lease_token

    async def load(self, conn: AsyncConnection, saga_id: uuid.UUID) -> SagaInstance | None:
        row = (await conn.execute(select(saga_instances).where(saga_instances.c.id == saga_id))).first()
        return _instance(row) if row else None

    async def get(self, saga_id: uuid.UUID) -> SagaInstance | None:
        async with self._db.read() as conn:
            return await self.load(conn, saga_id)

    async def fenced_update(
        self, conn: AsyncConnection, saga_id: uuid.UUID, token: int, **values: Any
    ) -> None:
        """Change the saga only if this runner's term is still the current one.

        A runner whose lease was taken over carries an older token: its write matches no row,
        `LeaseLost` is raised, and the transaction — with any local step effects — rolls back.
        """
        values.setdefault("updated_at", self._clock.now())
        result = await conn.execute(_FENCED_UPDATE, {"b_id": saga_id, "b_token": token, **values})
        if result.rowcount != 1:
            raise LeaseLost(f"saga {saga_id}: lease term {token} is no longer current")

    async def move(
        self,
        conn: AsyncConnection,
        saga: SagaInstance,
        step: StepOutcome | None = None,
        messages: StagedRows | None = None,
    ) -> None:
        """Write `saga`'s whole state (as the runner holds it) in one fenced statement on the driver
        path, in the caller's transaction, with the record of the `step` attempt that led to it and
        the outbox `messages` it emitted (one statement on PostgreSQL, one per table on SQLite);
        `LeaseLost` if its term (`lease_token`) is no longer the current one, and then nothing is
        written. `messages` need a `step`."""
        params: dict[str, Any] = {
            "b_id": saga.id,
            "b_token": saga.lease_token,
            "status": saga.status.value,
            "step_index": saga.step_index,
            "attempt": saga.attempt,
            "data": saga.data,
            "failure": saga.failure,
            "lease_expires_at": saga.lease_expires_at,
            "next_attempt_at": saga.next_attempt_at,
            "updated_at": saga.updated_at,
            "finished_at": saga.finished_at,
        }
        statement: Any = _MOVE
        if step is not None:
            statement = (
                _MOVE_AND_RECORD
                if messages is None
                else _move_with_messages(messages.count, notify=messages.notify)
            )
            if messages is not None:
                params.update(messages.params)
            params.update(_step_params(step, self._clock.now()))
        if not await on_connection(conn).rows(statement, params):
            raise LeaseLost(f"saga {saga.id}: lease term {saga.lease_token} is no longer current")

    async def renew(self, saga_id: uuid.UUID, token: int, *, lease_s: float) -> datetime:
        """Extend the lease by `lease_s` from now; the new expiry (raises `LeaseLost` if taken over).
        One statement, committed on its own."""
        now = self._clock.now()
        expires_at = now + timedelta(seconds=lease_s)
        params = {"b_id": saga_id, "b_token": token, "lease_expires_at": expires_at, "updated_at": now}
        async with self._db.autocommit() as conn:
            renewed = await on_connection(conn).rows(_RENEW, params)
        if not renewed:
            raise LeaseLost(f"saga {saga_id}: lease term {token} is no longer current")
        return expires_at

    async def history(self, saga_id: uuid.UUID) -> list[SagaStepRecord]:
        async with self._db.read() as conn:
            rows = await conn.execute(
                select(saga_steps).where(saga_steps.c.saga_id == saga_id).order_by(saga_steps.c.id)
            )
            return [
                SagaStepRecord(
                    step=r.step,
                    direction=r.direction,
                    attempt=r.attempt,
                    outcome=r.outcome,
                    error=r.error,
                    duration_ms=r.duration_ms,
                    recorded_at=r.recorded_at,
                )
                for r in rows
            ]

    async def find(self, *, status: SagaStatus | None = None, limit: int = 100) -> list[SagaInstance]:
        """Newest first; `status=FAILED` is the "needs attention" list."""
        stmt = select(saga_instances).order_by(saga_instances.c.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(saga_instances.c.status == status.value)
        async with self._db.read() as conn:
            return [_instance(r) for r in await conn.execute(stmt)]

    async def stuck_counts(self, *, grace_s: float) -> dict[tuple[str, str], int]:
        """Active sagas past their deadline by more than `grace_s`, by (saga type, status).

        Past its deadline a saga compensates, and runners claim it first (`_CLAIM_ORDER`); one still
        active long after is stuck: no runner alive, a compensation parked on a breaker that never
        closes, or a runner that keeps losing its lease.
        """
        cutoff = self._clock.now() - timedelta(seconds=grace_s)
        stmt = (
            select(saga_instances.c.saga_type, saga_instances.c.status, func.count())
            .where(_is_active(), saga_instances.c.deadline_at < cutoff)
            .group_by(saga_instances.c.saga_type, saga_instances.c.status)
        )
        async with self._db.read() as conn:
            return {(str(r[0]), str(r[1])): int(r[2]) for r in await conn.execute(stmt)}

    async def counts(self) -> dict[str, int]:
        async with self._db.read() as conn:
            rows = await conn.execute(
                select(saga_instances.c.status, func.count()).group_by(saga_instances.c.status)
            )
            return {str(r[0]): int(r[1]) for r in rows}
