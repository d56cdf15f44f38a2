"""Access control at the edge: revoked access tokens (by jti) and hashed partner API keys.

Revision ID: 0016
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_revoked_tokens",
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("jti", name="pk_identity_revoked_tokens"),
    )
    op.create_index("ix_identity_revoked_tokens_revoked_at", "identity_revoked_tokens", ["revoked_at"])
    op.create_index("ix_identity_revoked_tokens_expires_at", "identity_revoked_tokens", ["expires_at"])
    op.create_table(
        "identity_api_keys",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(500), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_identity_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_identity_api_keys_key_hash"),
    )


def downgrade() -> None:
    op.drop_table("identity_api_keys")
    op.drop_index("ix_identity_revoked_tokens_expires_at", table_name="identity_revoked_tokens")
    op.drop_index("ix_identity_revoked_tokens_revoked_at", table_name="identity_revoked_tokens")
    op.drop_table("identity_revoked_tokens")
