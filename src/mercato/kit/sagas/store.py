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
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    Uuid,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from mercato.kit.clock import Clock
from mercato.kit.coordination import LeaseLost
from mercato.kit.ids import new_id
from mercato.kit.observability import trace_carrier
from mercato.kit.sagas.wakeups import SagaWakeups
from mercato.kit.storage import Database, UTCDateTime, metadata

# The active sagas, as `_is_active` writes them (the same terms, so the planners match the index).
ACTIVE_SAGA_PREDICATE = "status = 'running' OR status = 'compensating'"

saga_instances = Table(
    "saga_instances",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("saga_type", String(100), nullable=False),
    Column("status", String(16), nullable=False),
    # running: the next step to run; compensating: the step being compensated (counting down).
    Column("step_index", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("data", JSON, nullable=False),
    Column("correlation_id", String(100), nullable=False),
    Column("failure", Text, nullable=True),
    Column("owner", String(100), nullable=True),
    Column("lease_token", BigInteger, nullable=False),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("deadline_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Index("ix_saga_instances_status_next_attempt_at", "status", "next_attempt_at"),
    # The claim's order (earliest deadline first, `_CLAIM_ORDER`) over the active sagas only: a claim
    # walks it and stops at its limit instead of sorting every due saga of a backlog on each poll.
    Index(
        "ix_saga_instances_active_deadline",
        "deadline_at",
        "next_attempt_at",
        postgresql_where=text(ACTIVE_SAGA_PREDICATE),
        sqlite_where=text(ACTIVE_SAGA_PREDICATE),
    ),
)

saga_steps = Table(
    "saga_steps",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("saga_id", Uuid, ForeignKey("saga_instances.id", ondelete="CASCADE"), nullable=False),
    Column("step", String(100), nullable=False),
    Column("direction", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", Text, nullable=True),
    Column("duration_ms", Integer, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    Index("ix_saga_steps_saga_id_id", "saga_id", "id"),
)


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
    # may use the partial index over the active sagas (`ACTIVE_SAGA_PREDICATE`).
    return or_(
        saga_instances.c.status == literal_column(f"'{SagaStatus.RUNNING.value}'"),
        saga_instances.c.status == literal_column(f"'{SagaStatus.COMPENSATING.value}'"),
    )


def _lease_free(now: datetime) -> ColumnElement[bool]:
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
_INSERT_STEP = insert(saga_steps)
_INSERT_SAGA = insert(saga_instances)


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


class SagaStore:
    def __init__(self, db: Database, clock: Clock, *, wakeups: SagaWakeups | None = None) -> None:
        self._db = db
        self._clock = clock
        self._wakeups = wakeups

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
    ) -> uuid.UUID:
        """Create a saga in the caller's transaction, so it exists iff the caller's change does.

        `completed_steps` counts steps the caller already did in this same transaction (the
        order saga's CreateOrder happens in the checkout request itself). With `wakeups`, runners
        in other processes hear of it when the transaction commits.
        """
        now = self._clock.now()
        saga_id = saga_id or new_id()
        carrier = trace_carrier()
        if carrier:
            # The runner continues the starter's trace in whichever process drives the saga.
            data = {**data, TRACE_KEY: carrier}
        await conn.execute(
            _INSERT_SAGA,
            {
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
            },
        )
        if self._wakeups is not None:
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
        """
        now = self._clock.now()
        due = (
            select(saga_instances.c.id)
            .where(_is_active(), saga_instances.c.next_attempt_at <= now, _lease_free(now))
            .order_by(*_CLAIM_ORDER)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due_sagas")
            .prefix_with("MATERIALIZED")
        )
        which = saga_instances.c.id.in_(select(due.c.id))
        async with self._db.write() as conn:
            rows = await conn.execute(self._claiming(owner, lease_s, now, which))
            claimed = [_instance(row) for row in rows]
        return sorted(claimed, key=lambda saga: (saga.deadline_at, saga.next_attempt_at))

    async def claim_instance(self, saga_id: uuid.UUID, *, owner: str, lease_s: float) -> SagaInstance | None:
        """Start a new lease term on one active saga; its row as claimed, or None if held/finished."""
        now = self._clock.now()
        async with self._db.write() as conn:
            row = (
                await conn.execute(self._claiming(owner, lease_s, now, saga_instances.c.id == saga_id))
            ).first()
        return _instance(row) if row else None

    async def claim(self, saga_id: uuid.UUID, *, owner: str, lease_s: float) -> int | None:
        """Start a new lease term on an active saga; its fencing token, or None if held/finished."""
        saga = await self.claim_instance(saga_id, owner=owner, lease_s=lease_s)
        return None if saga is None else saga.lease_token

    @staticmethod
    def _claiming(owner: str, lease_s: float, now: datetime, which: ColumnElement[bool]) -> Any:
        return (
            update(saga_instances)
            .where(which, _is_active(), _lease_free(now))
            .values(
                owner=owner,
                lease_token=saga_instances.c.lease_token + 1,
                lease_expires_at=now + timedelta(seconds=lease_s),
            )
            .returning(*saga_instances.c)
        )

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

    async def renew(self, saga_id: uuid.UUID, token: int, *, lease_s: float) -> datetime:
        """Extend the lease by `lease_s` from now; the new expiry (raises `LeaseLost` if taken over)."""
        expires_at = self._clock.now() + timedelta(seconds=lease_s)
        async with self._db.write() as conn:
            await self.fenced_update(conn, saga_id, token, lease_expires_at=expires_at)
        return expires_at

    async def record_step(
        self,
        conn: AsyncConnection,
        saga_id: uuid.UUID,
        *,
        step: str,
        direction: str,
        attempt: int,
        outcome: str,
        duration_ms: int,
        error: str | None = None,
    ) -> None:
        await conn.execute(
            _INSERT_STEP,
            {
                "id": new_id(),
                "saga_id": saga_id,
                "step": step,
                "direction": direction,
                "attempt": attempt,
                "outcome": outcome,
                "error": (error or None) and error[:2000],
                "duration_ms": duration_ms,
                "recorded_at": self._clock.now(),
            },
        )

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
