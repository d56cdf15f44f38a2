"""The saga engine's tables: instances and their step history (`store.py` reads and writes them)."""

from __future__ import annotations

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
    text,
)

from mercato.kit.storage import UTCDateTime, metadata

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
