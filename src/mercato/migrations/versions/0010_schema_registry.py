"""Schema registry: subjects with a compatibility mode and their schema versions.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_MODES = (
    "'NONE', 'BACKWARD', 'BACKWARD_TRANSITIVE', 'FORWARD', 'FORWARD_TRANSITIVE', 'FULL', 'FULL_TRANSITIVE'"
)


def upgrade() -> None:
    op.create_table(
        "schema_subjects",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("compatibility", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_schema_subjects"),
        sa.CheckConstraint(f"compatibility IN ({_MODES})", name="ck_schema_subjects_compatibility_known"),
    )
    op.create_table(
        "schema_versions",
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("schema", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("registered_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("subject", "version", name="pk_schema_versions"),
        sa.ForeignKeyConstraint(
            ["subject"],
            ["schema_subjects.name"],
            ondelete="CASCADE",
            name="fk_schema_versions_subject_schema_subjects",
        ),
        sa.UniqueConstraint("subject", "fingerprint", name="uq_schema_versions_subject_fingerprint"),
        sa.CheckConstraint("version >= 1", name="ck_schema_versions_version_positive"),
    )


def downgrade() -> None:
    op.drop_table("schema_versions")
    op.drop_table("schema_subjects")
