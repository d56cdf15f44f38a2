"""Contract: drop the plaintext `identity_users.email` and `display_name` (and the unique constraint on
`email`); the sealed fields of 0027 (the expand) are all that is left (ADRs 0047, 0052).

Refuses, changing nothing, while
- a process that reported in the last `LIVE_WITHIN_S` seconds still needs a plaintext column
  (`runtime_processes.needs`, refreshed by every API and worker process: releases running
  `MERCATO_RELEASE_IDENTITY_PERSONAL_COLUMNS=plaintext` or `dual`), or
- an account is still plaintext only (`mercato backfill sealed-personal-fields` has not finished).

After it, no plaintext copy of an address or name is left in the table: the end of the rollout.
The downgrade puts the columns back (nullable, empty): going back to a plaintext release after this
step needs a restore (docs/runbooks/release.md).

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-06
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from mercato.kit.dynconfig.tables import runtime_processes

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None

# As the releases name them in their reports (shop/identity/personal.py PLAINTEXT_COLUMNS; a migration
# keeps its own copy, since it must not change when the code does).
PLAINTEXT_COLUMNS = ("identity_users.email", "identity_users.display_name")
# A process refreshes its report every 5 s (kit/dynconfig REPORT_EVERY_S); six missed, it is gone.
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
        if set(PLAINTEXT_COLUMNS) & set(row.needs.split(",")) and row.seen_at >= since
    ]


def upgrade() -> None:
    bind = op.get_bind()
    needed = _still_needed(bind)
    if needed:
        raise ContractRefused(
            f"contract refused: {len(needed)} running process(es) still use the plaintext columns "
            f"{', '.join(PLAINTEXT_COLUMNS)}: "
            + ", ".join(needed)
            + "; roll them to a release with MERCATO_RELEASE_IDENTITY_PERSONAL_COLUMNS=sealed first"
        )
    unsealed = bind.execute(
        sa.text("SELECT count(*) FROM identity_users WHERE email_sealed IS NULL AND email IS NOT NULL")
    ).scalar_one()
    if unsealed:
        raise ContractRefused(
            f"contract refused: {unsealed} account(s) are not sealed yet; "
            "run `mercato backfill sealed-personal-fields`"
        )
    with op.batch_alter_table("identity_users") as batch:
        batch.drop_constraint("uq_identity_users_email", type_="unique")
        batch.drop_column("display_name")
        batch.drop_column("email")


def downgrade() -> None:
    with op.batch_alter_table("identity_users") as batch:
        batch.add_column(sa.Column("email", sa.String(254), nullable=True))
        batch.add_column(sa.Column("display_name", sa.String(100), nullable=True))
        batch.create_unique_constraint("uq_identity_users_email", ["email"])
