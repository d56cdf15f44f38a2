"""The versioned runtime configuration and the processes' version reports (ADR 0045).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runtime_config_versions",
        sa.Column("version", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("comment", sa.String(500), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_runtime_config_versions"),
    )
    op.create_table(
        "runtime_processes",
        sa.Column("process_id", sa.String(200), nullable=False),
        sa.Column("role", sa.String(40), nullable=False),
        sa.Column("app_version", sa.String(60), nullable=False),
        sa.Column("config_version", sa.Integer, nullable=False),
        sa.Column("needs", sa.String(500), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("seen_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("process_id", name="pk_runtime_processes"),
    )


def downgrade() -> None:
    op.drop_table("runtime_processes")
    op.drop_table("runtime_config_versions")
