"""Identity: users and refresh-token families.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_users",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("display_name", sa.String(100), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_identity_users"),
        sa.UniqueConstraint("email", name="uq_identity_users_email"),
        sa.CheckConstraint("role IN ('customer', 'admin', 'service')", name="ck_identity_users_role_known"),
    )
    op.create_table(
        "identity_refresh_tokens",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("family_id", sa.Uuid, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("issued_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("rotated_at", UTCDateTime, nullable=True),
        sa.Column("replaced_by", sa.Uuid, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_identity_refresh_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_identity_refresh_tokens_token_hash"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["identity_users.id"],
            ondelete="CASCADE",
            name="fk_identity_refresh_tokens_user_id_identity_users",
        ),
        sa.CheckConstraint(
            "status IN ('active', 'rotated', 'revoked')", name="ck_identity_refresh_tokens_status_known"
        ),
    )
    op.create_index("ix_identity_refresh_tokens_family_id", "identity_refresh_tokens", ["family_id"])
    op.create_index("ix_identity_refresh_tokens_user_id", "identity_refresh_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_table("identity_refresh_tokens")
    op.drop_table("identity_users")
