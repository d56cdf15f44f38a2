"""The cart context's tables. Prices are not stored: they are resolved from the catalog on read."""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Column, Integer, PrimaryKeyConstraint, String, Table, Uuid

from mercato.kit.storage import UTCDateTime, metadata

cart_items = Table(
    "cart_items",
    metadata,
    Column("customer_id", Uuid, nullable=False),
    Column("sku", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("added_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("customer_id", "sku"),
    CheckConstraint("quantity > 0 AND quantity <= 999", name="quantity_bounded"),
)
