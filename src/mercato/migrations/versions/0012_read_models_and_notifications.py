"""Read models (projection checkpoints, order_summary, sales_by_day) and notifications.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", "topic", "partition", name="pk_projection_checkpoints"),
    )
    op.create_table(
        "order_summary",
        sa.Column("order_id", sa.Uuid, nullable=False),
        sa.Column("customer_id", sa.Uuid, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("total_minor", sa.BigInteger, nullable=True),
        sa.Column("item_count", sa.Integer, nullable=False),
        sa.Column("items", sa.JSON, nullable=False),
        sa.Column("payment_state", sa.String(16), nullable=False),
        sa.Column("placed_at", UTCDateTime, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("order_id", name="pk_order_summary"),
    )
    op.create_index("ix_order_summary_customer_id_order_id", "order_summary", ["customer_id", "order_id"])
    op.create_table(
        "sales_by_day",
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("orders", sa.Integer, nullable=False),
        sa.Column("revenue_minor", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("day", "currency", name="pk_sales_by_day"),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("event_type", sa.String(200), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("order_id", sa.Uuid, nullable=False),
        sa.Column("recipient", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_notifications"),
        sa.UniqueConstraint("event_id", "channel", name="uq_notifications_event_id_channel"),
        sa.CheckConstraint("channel IN ('email', 'webhook')", name="ck_notifications_channel_known"),
        sa.CheckConstraint("status IN ('pending', 'sent', 'failed')", name="ck_notifications_status_known"),
    )
    op.create_index("ix_notifications_order_id_id", "notifications", ["order_id", "id"])


def downgrade() -> None:
    op.drop_table("notifications")
    op.drop_table("sales_by_day")
    op.drop_table("order_summary")
    op.drop_table("projection_checkpoints")
