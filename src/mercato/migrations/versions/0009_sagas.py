"""Sagas: instances and their step history.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_instances",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("saga_type", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step_index", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("correlation_id", sa.String(100), nullable=False),
        sa.Column("failure", sa.Text, nullable=True),
        sa.Column("owner", sa.String(100), nullable=True),
        sa.Column("lease_token", sa.BigInteger, nullable=False),
        sa.Column("lease_expires_at", UTCDateTime, nullable=True),
        sa.Column("next_attempt_at", UTCDateTime, nullable=False),
        sa.Column("deadline_at", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_saga_instances"),
        sa.CheckConstraint(
            "status IN ('running', 'compensating', 'completed', 'compensated', 'failed')",
            name="ck_saga_instances_status_known",
        ),
        sa.CheckConstraint("lease_token >= 0", name="ck_saga_instances_lease_token_non_negative"),
    )
    op.create_index(
        "ix_saga_instances_status_next_attempt_at", "saga_instances", ["status", "next_attempt_at"]
    )
    op.create_table(
        "saga_steps",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("saga_id", sa.Uuid, nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_saga_steps"),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["saga_instances.id"],
            ondelete="CASCADE",
            name="fk_saga_steps_saga_id_saga_instances",
        ),
    )
    op.create_index("ix_saga_steps_saga_id_id", "saga_steps", ["saga_id", "id"])


def downgrade() -> None:
    op.drop_table("saga_steps")
    op.drop_table("saga_instances")
