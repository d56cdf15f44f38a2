"""Coordination: leases with fencing tokens.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coordination_leases",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("fencing_token", sa.BigInteger, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("acquired_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_coordination_leases"),
        sa.CheckConstraint("fencing_token >= 1", name="ck_coordination_leases_token_positive"),
    )


def downgrade() -> None:
    op.drop_table("coordination_leases")
