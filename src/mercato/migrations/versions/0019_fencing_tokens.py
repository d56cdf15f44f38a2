"""Fencing tokens: the newest term seen per fenced resource (ADR 0041).

Revision ID: 0019
Revises: 0028
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0028"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coordination_fencing_tokens",
        sa.Column("resource", sa.String(200), nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("resource", name="pk_coordination_fencing_tokens"),
    )


def downgrade() -> None:
    op.drop_table("coordination_fencing_tokens")
