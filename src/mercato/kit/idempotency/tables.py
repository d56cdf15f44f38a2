"""The `idempotency_keys` table: one row per (caller scope, key), the claim and then the response."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from mercato.kit.storage import UTCDateTime, metadata

__all__ = ["COMPLETED", "IN_FLIGHT", "idempotency_keys"]

IN_FLIGHT = "in_flight"
COMPLETED = "completed"

SCOPE_LENGTH = 255
PATH_LENGTH = 1000

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    # Who sent the key ("sub:<subject>", "anon:<ip>"): keys are unique per caller, not globally.
    Column("scope", String(SCOPE_LENGTH), nullable=False),
    Column("key", String(255), nullable=False),
    # For operators only (the fingerprint already covers them); the path is truncated to fit.
    Column("method", String(16), nullable=False),
    Column("path", String(PATH_LENGTH), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    # A fresh random token per claim: completion and release only touch the row while it is still
    # ours, so a request whose lock expired and was taken over cannot overwrite the new owner's row.
    Column("claim_token", String(32), nullable=False),
    Column("locked_until", UTCDateTime, nullable=True),
    Column("response_status", Integer, nullable=True),
    Column("response_headers", Text, nullable=True),
    Column("response_body", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("scope", "key"),
    CheckConstraint("state IN ('in_flight', 'completed')", name="state_known"),
    CheckConstraint(
        "(state = 'in_flight' AND locked_until IS NOT NULL)"
        " OR (state = 'completed' AND response_status IS NOT NULL AND response_body IS NOT NULL)",
        name="state_consistent",
    ),
    # The purge job walks expired rows in batches.
    Index("ix_idempotency_keys_expires_at", "expires_at"),
)
