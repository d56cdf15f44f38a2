"""The inventory context's tables."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Uuid,
    text,
)

from mercato.kit.storage import UTCDateTime, metadata

# The active reservations, written as `due_ids` writes its condition (a literal, not a parameter, so
# the planner can prove a prepared query implies the partial index's predicate).
ACTIVE_RESERVATION_PREDICATE = "status = 'active'"

stock = Table(
    "inventory_stock",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("available", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    # Units that left the warehouse: initial stock = available + reserved + committed, always.
    Column("committed", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("available >= 0", name="available_non_negative"),
    CheckConstraint("reserved >= 0", name="reserved_non_negative"),
    CheckConstraint("committed >= 0", name="committed_non_negative"),
    # Room for HOT updates: each row is updated twice a checkout (migration 0031, ADR 0075).
    postgresql_with={"fillfactor": 50},
)

reservations = Table(
    "inventory_reservations",
    metadata,
    Column("id", Uuid, primary_key=True),
    # The caller's key for this reservation (an order id): reserving twice for it is a no-op.
    Column("reference", String(100), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("status IN ('active', 'released', 'committed', 'expired')", name="status_known"),
    # The expirer's (`due_ids`) only: the active reservations in (expires_at, id) order. Partial, so
    # ending a reservation (every checkout's commit) adds no entry to it.
    Index(
        "ix_inventory_reservations_active_expires_at",
        "expires_at",
        "id",
        postgresql_where=text(ACTIVE_RESERVATION_PREDICATE),
        sqlite_where=text(ACTIVE_RESERVATION_PREDICATE),
    ),
)

reservation_lines = Table(
    "inventory_reservation_lines",
    metadata,
    Column(
        "reservation_id", Uuid, ForeignKey("inventory_reservations.id", ondelete="CASCADE"), nullable=False
    ),
    Column("sku", String(64), ForeignKey("inventory_stock.sku"), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    PrimaryKeyConstraint("reservation_id", "sku"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
)
