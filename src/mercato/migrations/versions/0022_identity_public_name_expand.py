"""Expand: `identity_users.public_name`, nullable, beside `display_name` (the rename's first step).

Safe with every release: release 1.0 (NameColumns.LEGACY) neither reads nor writes it; release 1.1
(DUAL) writes both. Then `mercato backfill public-names` copies the old rows, the flag
`identity.read_public_name` switches reads, and 0023 contracts (docs/runbooks/release.md).

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("identity_users", sa.Column("public_name", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("identity_users") as batch:
        batch.drop_column("public_name")
