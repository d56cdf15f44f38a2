"""Chat sharding: the shard map (main database) and per-shard move fences (ADR 0043).

Revision ID: 0020
Revises: 0018
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0020"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chat_shard_fences",
        sa.Column("room_id", sa.Uuid, nullable=False),
        sa.Column("moved_to", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("fenced_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_chat_shard_fences"),
    )
    op.create_table(
        "chat_shard_map",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_chat_shard_map"),
    )


def downgrade() -> None:
    op.drop_table("chat_shard_map")
    op.drop_table("chat_shard_fences")
