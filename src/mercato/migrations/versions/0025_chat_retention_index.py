"""Chat retention: an index on chat_messages.sent_at for the worker's purge (issue 13, offline queue TTL).

Revision ID: 0025
Revises: 0019
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0025"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_chat_messages_sent_at", "chat_messages", ["sent_at"])


def downgrade() -> None:
    op.drop_index("ix_chat_messages_sent_at", "chat_messages")
