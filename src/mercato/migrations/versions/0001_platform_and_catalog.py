"""Platform metadata and the catalog's products.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

LIVE_PG = sa.text("NOT archived")
LIVE_SQLITE = sa.text("archived = 0")


def upgrade() -> None:
    op.create_table(
        "platform_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(1000), nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_platform_meta"),
    )
    op.create_table(
        "catalog_products",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("price_minor", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("category", sa.String(64), nullable=False),
        sa.Column("attributes", sa.JSON, nullable=False),
        sa.Column("archived", sa.Boolean, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_catalog_products"),
        sa.UniqueConstraint("sku", name="uq_catalog_products_sku"),
        sa.CheckConstraint("price_minor >= 0", name="ck_catalog_products_price_non_negative"),
        sa.CheckConstraint("length(currency) = 3", name="ck_catalog_products_currency_iso4217"),
        sa.CheckConstraint("version >= 1", name="ck_catalog_products_version_positive"),
    )
    for name, columns in (
        ("ix_catalog_products_live_id", ["id"]),
        ("ix_catalog_products_live_price", ["price_minor", "id"]),
        ("ix_catalog_products_live_name", ["name", "id"]),
        ("ix_catalog_products_live_category_price", ["category", "price_minor", "id"]),
    ):
        op.create_index(name, "catalog_products", columns, postgresql_where=LIVE_PG, sqlite_where=LIVE_SQLITE)
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        available = bind.execute(
            sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
        ).first()
        if available:
            op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            # Name search is `name ILIKE '%term%'`: a trigram GIN index serves it on PostgreSQL.
            op.execute(
                "CREATE INDEX ix_catalog_products_name_trgm ON catalog_products "
                "USING gin (name gin_trgm_ops) WHERE NOT archived"
            )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_catalog_products_name_trgm")
    op.drop_table("catalog_products")
    op.drop_table("platform_meta")
