"""What a saga is: steps, their compensations, and how each is retried."""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.messaging import StagedRows


class StepRejected(Exception):
    """A definite, permanent failure with no effect to undo (payment declined, out of stock).

    Any other exception, a timeout included, is *uncertain*: the step may have taken effect (a
    request that succeeded but whose response was lost), so it is retried and, if it never
    succeeds, compensated along with the steps before it.
    """


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Full-jitter exponential backoff: delay = uniform(0, min(cap_s, base_s * 2**(attempt-1)))."""

    max_attempts: int = 3
    base_s: float = 0.05
    cap_s: float = 2.0

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** max(0, attempt - 1)))


class EventSink(Protocol):
    """Where emitted events go, inside the saga's own transaction (e.g. a transactional outbox)."""

    async def add(self, conn: AsyncConnection, events: Sequence[Mapping[str, Any]]) -> None: ...


@runtime_checkable
class StagingEventSink(EventSink, Protocol):
    """A sink whose events can ride in the saga's move itself (`OutboxEventSink`): `stage` hands
    them over as outbox rows for the move's statement to insert, or None when they cannot (`add`)."""

    def stage(self, conn: AsyncConnection, events: Sequence[Mapping[str, Any]]) -> StagedRows | None: ...


@dataclass
class StepContext:
    """What a step sees. `conn` is the saga's transaction for local steps, `None` for remote ones."""

    saga_id: uuid.UUID
    saga_type: str
    correlation_id: str
    step: str
    attempt: int
    data: dict[str, Any]
    conn: AsyncConnection | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and crashes, so a remote call repeated is applied once."""
        return f"{self.saga_id}:{self.step}"

    def emit(self, event_type: str, payload: Mapping[str, Any]) -> None:
        """Record an event; it is stored with the step's outcome, in the same transaction."""
        self.events.append(
            {
                "type": event_type,
                "saga_id": str(self.saga_id),
                "correlation_id": self.correlation_id,
                "step": self.step,
                "data": dict(payload),
            }
        )


StepFn = Callable[[StepContext], Awaitable[Mapping[str, Any] | None]]
CompensationFn = Callable[[StepContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Step:
    """One step. A *local* step runs inside the saga's write transaction (`ctx.conn`), so its
    effects commit atomically with the saga's progress; a remote step runs outside any
    transaction and must be idempotent on `ctx.idempotency_key`. Whatever the action returns is
    merged into the saga's data for later steps and compensations."""

    name: str
    action: StepFn
    compensation: CompensationFn | None = None
    local: bool = False
    timeout_s: float = 5.0
    retry: RetrySchedule = RetrySchedule()
    compensation_retry: RetrySchedule = RetrySchedule(max_attempts=20, base_s=0.1, cap_s=10.0)


@dataclass(frozen=True, slots=True)
class SagaDefinition:
    name: str
    steps: tuple[Step, ...]
    # A running saga older than this stops moving forward and compensates instead.
    deadline_s: float = 300.0
    on_completed: CompensationFn | None = None
    on_compensated: CompensationFn | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"saga {self.name}: step names must be unique")
        if not self.steps:
            raise ValueError(f"saga {self.name}: needs at least one step")

    def index_of(self, step: str) -> int:
        for i, candidate in enumerate(self.steps):
            if candidate.name == step:
                return i
        raise KeyError(step)
