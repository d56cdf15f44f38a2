"""The saga claim's order over the active sagas: earliest deadline first.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

ACTIVE = "status = 'running' OR status = 'compensating'"


def upgrade() -> None:
    op.create_index(
        "ix_saga_instances_active_deadline",
        "saga_instances",
        ["deadline_at", "next_attempt_at"],
        postgresql_where=sa.text(ACTIVE),
        sqlite_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_index("ix_saga_instances_active_deadline", table_name="saga_instances")
