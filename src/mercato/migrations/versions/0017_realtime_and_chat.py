"""Real-time delivery (the SQL broker's log, sequenced channel history) and the chat context.

Revision ID: 0017
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "realtime_broker_log",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_realtime_broker_log_created_at", "realtime_broker_log", ["created_at"])
    op.create_table(
        "realtime_channel_history",
        sa.Column("channel", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("dedup_key", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("channel", "seq", name="pk_realtime_channel_history"),
        sa.UniqueConstraint("channel", "dedup_key", name="uq_realtime_channel_history_dedup"),
    )
    op.create_table(
        "chat_rooms",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("order_id", sa.Uuid, nullable=True, unique=True),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "chat_members",
        sa.Column("room_id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("joined_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("room_id", "user_id", name="pk_chat_members"),
    )
    op.create_table(
        "chat_messages",
        sa.Column("room_id", sa.Uuid, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("client_msg_id", sa.String(100), nullable=False),
        sa.Column("sent_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("room_id", "seq", name="pk_chat_messages"),
        sa.UniqueConstraint("room_id", "sender", "client_msg_id", name="uq_chat_messages_client_msg"),
    )


def downgrade() -> None:
    for table in ("chat_messages", "chat_members", "chat_rooms", "realtime_channel_history"):
        op.drop_table(table)
    op.drop_index("ix_realtime_broker_log_created_at", "realtime_broker_log")
    op.drop_table("realtime_broker_log")
