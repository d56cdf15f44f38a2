"""Inventory: stock per SKU, reservations and their lines.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inventory_stock",
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("available", sa.BigInteger, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.Column("committed", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("sku", name="pk_inventory_stock"),
        sa.CheckConstraint("available >= 0", name="ck_inventory_stock_available_non_negative"),
        sa.CheckConstraint("reserved >= 0", name="ck_inventory_stock_reserved_non_negative"),
        sa.CheckConstraint("committed >= 0", name="ck_inventory_stock_committed_non_negative"),
    )
    op.create_table(
        "inventory_reservations",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("reference", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_inventory_reservations"),
        sa.UniqueConstraint("reference", name="uq_inventory_reservations_reference"),
        sa.CheckConstraint(
            "status IN ('active', 'released', 'committed', 'expired')",
            name="ck_inventory_reservations_status_known",
        ),
    )
    op.create_index(
        "ix_inventory_reservations_status_expires_at", "inventory_reservations", ["status", "expires_at"]
    )
    op.create_table(
        "inventory_reservation_lines",
        sa.Column("reservation_id", sa.Uuid, nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("quantity", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("reservation_id", "sku", name="pk_inventory_reservation_lines"),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["inventory_reservations.id"],
            ondelete="CASCADE",
            name="fk_inventory_reservation_lines_reservation_id",
        ),
        sa.ForeignKeyConstraint(["sku"], ["inventory_stock.sku"], name="fk_inventory_reservation_lines_sku"),
        sa.CheckConstraint("quantity > 0", name="ck_inventory_reservation_lines_quantity_positive"),
    )


def downgrade() -> None:
    op.drop_table("inventory_reservation_lines")
    op.drop_table("inventory_reservations")
    op.drop_table("inventory_stock")
