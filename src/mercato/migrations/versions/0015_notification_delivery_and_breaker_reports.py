"""Notification delivery (attempts, last error, next attempt, sent at) and the breaker reports table.

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0015"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_error", sa.Text, nullable=True))
        batch.add_column(sa.Column("next_attempt_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("sent_at", UTCDateTime, nullable=True))
    op.create_index("ix_notifications_status_next_attempt_at", "notifications", ["status", "next_attempt_at"])
    op.create_table(
        "resilience_breaker_reports",
        sa.Column("process", sa.String(200), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("snapshot", sa.Text, nullable=False),
        sa.Column("reported_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("process", "name", name="pk_resilience_breaker_reports"),
    )
    op.create_index(
        "ix_resilience_breaker_reports_reported_at", "resilience_breaker_reports", ["reported_at"]
    )


def downgrade() -> None:
    op.drop_table("resilience_breaker_reports")
    op.drop_index("ix_notifications_status_next_attempt_at", table_name="notifications")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("sent_at")
        batch.drop_column("next_attempt_at")
        batch.drop_column("last_error")
        batch.drop_column("attempts")
