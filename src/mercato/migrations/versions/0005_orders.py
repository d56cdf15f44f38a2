"""Orders and their lines.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("customer_id", sa.Uuid, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("total_minor", sa.BigInteger, nullable=False),
        sa.Column("item_count", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_orders"),
        sa.CheckConstraint(
            "status IN ('pending', 'confirmed', 'completed', 'cancelled', 'failed')",
            name="ck_orders_status_known",
        ),
        sa.CheckConstraint("total_minor >= 0", name="ck_orders_total_non_negative"),
        sa.CheckConstraint("item_count > 0", name="ck_orders_item_count_positive"),
    )
    op.create_index("ix_orders_customer_id_id", "orders", ["customer_id", "id"])
    op.create_table(
        "orders_lines",
        sa.Column("order_id", sa.Uuid, nullable=False),
        sa.Column("line_no", sa.Integer, nullable=False),
        sa.Column("product_id", sa.Uuid, nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("unit_price_minor", sa.BigInteger, nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("line_total_minor", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("order_id", "line_no", name="pk_orders_lines"),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], ondelete="CASCADE", name="fk_orders_lines_order_id_orders"
        ),
        sa.CheckConstraint("quantity > 0", name="ck_orders_lines_quantity_positive"),
        sa.CheckConstraint("unit_price_minor >= 0", name="ck_orders_lines_unit_price_non_negative"),
        sa.CheckConstraint(
            "line_total_minor = unit_price_minor * quantity", name="ck_orders_lines_line_total_consistent"
        ),
    )


def downgrade() -> None:
    op.drop_table("orders_lines")
    op.drop_table("orders")
