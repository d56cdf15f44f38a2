"""Reporting's read-model tables. Disposable: `mercato projections rebuild` recreates them from the log."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Uuid,
)

from mercato.kit.storage import UTCDateTime, metadata

order_summary = Table(
    "order_summary",
    metadata,
    Column("order_id", Uuid, primary_key=True),
    # Null until an order event (not just a payment event) for the order has been applied.
    Column("customer_id", Uuid, nullable=True),
    Column("status", String(16), nullable=False),
    Column("currency", String(3), nullable=True),
    Column("total_minor", BigInteger, nullable=True),
    Column("item_count", Integer, nullable=False),
    # Denormalized on purpose: a list page is one index range scan, no join with lines.
    Column("items", JSON, nullable=False),
    Column("payment_state", String(16), nullable=False),
    Column("placed_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    # "My orders, newest first" by keyset: order ids are UUIDv7, so id order is placing order.
    Index("ix_order_summary_customer_id_order_id", "customer_id", "order_id"),
)

sales_by_day = Table(
    "sales_by_day",
    metadata,
    Column("day", Date, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("orders", Integer, nullable=False),
    Column("revenue_minor", BigInteger, nullable=False),
    PrimaryKeyConstraint("day", "currency"),
)
