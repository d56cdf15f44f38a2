"""The catalog context's tables."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Index,
    Integer,
    String,
    Table,
    Text,
    Uuid,
)

from mercato.kit.storage import UTCDateTime, metadata

products = Table(
    "catalog_products",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("sku", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("price_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("category", String(64), nullable=False),
    Column("attributes", JSON, nullable=False),
    Column("archived", Boolean, nullable=False, default=False),
    Column("version", Integer, nullable=False, default=1),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("price_minor >= 0", name="price_non_negative"),
    CheckConstraint("length(currency) = 3", name="currency_iso4217"),
    CheckConstraint("version >= 1", name="version_positive"),
    # Listing indexes: one per sort order, partial on the rows the public list can see.
    Index("ix_catalog_products_live_id", "id", postgresql_where="NOT archived", sqlite_where="archived = 0"),
    Index(
        "ix_catalog_products_live_price",
        "price_minor",
        "id",
        postgresql_where="NOT archived",
        sqlite_where="archived = 0",
    ),
    Index(
        "ix_catalog_products_live_name",
        "name",
        "id",
        postgresql_where="NOT archived",
        sqlite_where="archived = 0",
    ),
    Index(
        "ix_catalog_products_live_category_price",
        "category",
        "price_minor",
        "id",
        postgresql_where="NOT archived",
        sqlite_where="archived = 0",
    ),
)
