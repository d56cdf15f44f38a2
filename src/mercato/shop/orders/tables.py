"""The orders context's tables. Lines copy name and price: an order is a record of what was sold."""

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

orders = Table(
    "orders",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("customer_id", Uuid, nullable=False),
    Column("status", String(16), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("total_minor", BigInteger, nullable=False),
    Column("item_count", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint(
        "status IN ('pending', 'confirmed', 'completed', 'cancelled', 'failed')", name="status_known"
    ),
    CheckConstraint("total_minor >= 0", name="total_non_negative"),
    CheckConstraint("item_count > 0", name="item_count_positive"),
    # "My orders, newest first": ids are UUIDv7, so (customer_id, id) is also creation order.
    Index("ix_orders_customer_id_id", "customer_id", "id"),
)

order_lines = Table(
    "orders_lines",
    metadata,
    Column("order_id", Uuid, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("product_id", Uuid, nullable=False),
    Column("sku", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("unit_price_minor", BigInteger, nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("line_total_minor", BigInteger, nullable=False),
    PrimaryKeyConstraint("order_id", "line_no"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
    CheckConstraint("unit_price_minor >= 0", name="unit_price_non_negative"),
    CheckConstraint("line_total_minor = unit_price_minor * quantity", name="line_total_consistent"),
)
