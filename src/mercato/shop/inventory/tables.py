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
)

from mercato.kit.storage import UTCDateTime, metadata

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
    Index("ix_inventory_reservations_status_expires_at", "status", "expires_at"),
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
