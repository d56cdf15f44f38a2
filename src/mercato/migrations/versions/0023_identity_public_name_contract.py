"""Contract: drop `identity_users.display_name`; `public_name` becomes NOT NULL.

Refuses (and changes nothing) while
- a process that reported in the last `LIVE_WITHIN_S` seconds still needs the old column
  (`runtime_processes.needs`, written by every API and worker process each poll: releases running
  NameColumns.LEGACY or DUAL), or
- a row has no `public_name` yet (`mercato backfill public-names` has not finished).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from mercato.kit.dynconfig.tables import runtime_processes

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

LEGACY_COLUMN = "identity_users.display_name"
# Three missed polls at the slowest allowed interval, and the process is taken for gone.
LIVE_WITHIN_S = 30.0


class ContractRefused(RuntimeError):
    pass


def _still_needed(bind: sa.Connection) -> list[str]:
    since = datetime.now(UTC) - timedelta(seconds=LIVE_WITHIN_S)
    t = runtime_processes
    rows = bind.execute(sa.select(t.c.process_id, t.c.app_version, t.c.needs, t.c.seen_at)).all()
    return [
        f"{row.process_id} (release {row.app_version})"
        for row in rows
        if LEGACY_COLUMN in row.needs.split(",") and row.seen_at >= since
    ]


def upgrade() -> None:
    bind = op.get_bind()
    needed = _still_needed(bind)
    if needed:
        raise ContractRefused(
            f"contract refused: {len(needed)} running process(es) still use {LEGACY_COLUMN}: "
            + ", ".join(needed)
            + "; roll them to a release with MERCATO_RELEASE_IDENTITY_NAME_COLUMNS=new first"
        )
    missing = bind.execute(
        sa.text("SELECT count(*) FROM identity_users WHERE public_name IS NULL")
    ).scalar_one()
    if missing:
        raise ContractRefused(
            f"contract refused: {missing} user(s) have no public_name yet; run `mercato backfill public-names`"
        )
    with op.batch_alter_table("identity_users") as batch:
        batch.alter_column("public_name", existing_type=sa.String(100), nullable=False)
        batch.drop_column("display_name")


def downgrade() -> None:
    with op.batch_alter_table("identity_users") as batch:
        batch.add_column(sa.Column("display_name", sa.String(100), nullable=True))
    op.execute("UPDATE identity_users SET display_name = public_name")
    with op.batch_alter_table("identity_users") as batch:
        batch.alter_column("display_name", existing_type=sa.String(100), nullable=False)
