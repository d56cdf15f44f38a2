"""Messaging: transactional outbox, the embedded stream (log, heads, group cursors, attempts),
dead letters and the consumers' inbox.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_UNPUBLISHED = sa.text("published_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "messaging_outbox",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("claimed_until", UTCDateTime, nullable=True),
        sa.Column("claim_token", sa.Uuid, nullable=True),
        sa.Column("published_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_messaging_outbox"),
    )
    op.create_index(
        "ix_messaging_outbox_unpublished_id",
        "messaging_outbox",
        ["id"],
        postgresql_where=_UNPUBLISHED,
        sqlite_where=_UNPUBLISHED,
    )
    op.create_index(
        "ix_messaging_outbox_unpublished_key_id",
        "messaging_outbox",
        ["key", "id"],
        postgresql_where=_UNPUBLISHED,
        sqlite_where=_UNPUBLISHED,
    )
    op.create_index("ix_messaging_outbox_published_at", "messaging_outbox", ["published_at"])

    op.create_table(
        "messaging_stream_heads",
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", name="pk_messaging_stream_heads"),
    )
    op.create_table(
        "messaging_stream_log",
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("message_id", sa.Uuid, nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("appended_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("topic", "partition", "offset", name="pk_messaging_stream_log"),
        sa.UniqueConstraint("message_id", name="uq_messaging_stream_log_message_id"),
    )
    op.create_index(
        "ix_messaging_stream_log_topic_appended_at", "messaging_stream_log", ["topic", "appended_at"]
    )
    op.create_table(
        "messaging_stream_cursors",
        sa.Column("group", sa.String(100), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("batch_end", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("lease_until", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("group", "topic", "partition", name="pk_messaging_stream_cursors"),
    )
    op.create_table(
        "messaging_stream_attempts",
        sa.Column("group", sa.String(100), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("acked", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("group", "topic", "partition", "offset", name="pk_messaging_stream_attempts"),
    )
    op.create_table(
        "messaging_dead_letters",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("group", sa.String(100), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("message_id", sa.Uuid, nullable=False),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("dead_at", UTCDateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("visible_at", UTCDateTime, nullable=True),
        sa.Column("replayed_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_messaging_dead_letters"),
        sa.CheckConstraint(
            "status IN ('dead', 'replaying', 'replayed')", name="ck_messaging_dead_letters_status_known"
        ),
    )
    op.create_index(
        "ix_messaging_dead_letters_group_status_id", "messaging_dead_letters", ["group", "status", "id"]
    )
    op.create_index("ix_messaging_dead_letters_topic_id", "messaging_dead_letters", ["topic", "id"])
    op.create_table(
        "messaging_inbox",
        sa.Column("consumer", sa.String(100), nullable=False),
        sa.Column("message_id", sa.Uuid, nullable=False),
        sa.Column("processed_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", name="pk_messaging_inbox"),
    )
    op.create_index("ix_messaging_inbox_processed_at", "messaging_inbox", ["processed_at"])


def downgrade() -> None:
    op.drop_table("messaging_inbox")
    op.drop_table("messaging_dead_letters")
    op.drop_table("messaging_stream_attempts")
    op.drop_table("messaging_stream_cursors")
    op.drop_table("messaging_stream_log")
    op.drop_table("messaging_stream_heads")
    op.drop_table("messaging_outbox")
