"""Vacuum the two claimed queues by dead rows, not by a fraction of the table (issue 16, ADR 0079).

The outbox relay claims `ORDER BY id` from the partial index over the unpublished rows, and the saga
runner claims from the partial index over the active sagas. Publishing a message (or finishing a
saga) is an UPDATE that changes an indexed column, so the old version's entry stays in the partial
index until a vacuum; every claim starts at the oldest end and walks them. Both tables keep their
finished rows (until the purge), so PostgreSQL's default trigger, 20 % of the table dead, comes ever
more rarely: measured on the checkout bench at 50/s, one relay claim hit 880 shared blocks after
~1,000 checkouts and 3,554 after ~2,200, and the saga claim 217 → 478, growing with every checkout.

With `autovacuum_vacuum_scale_factor = 0` a vacuum starts once `autovacuum_vacuum_threshold` rows
are dead (at most one per `autovacuum_naptime`, 1 min by default), so the dead entries a claim
walks are bounded by about a minute of traffic instead of growing with the table. PostgreSQL only;
SQLite has no autovacuum and its claims read the same rows through its own indexes.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0032"
down_revision = "0031"
branch_labels = None
depends_on = None

VACUUM_THRESHOLDS = {"messaging_outbox": 1000, "saga_instances": 1000}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, threshold in VACUUM_THRESHOLDS.items():
            op.execute(
                f"ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = 0,"
                f" autovacuum_vacuum_threshold = {threshold})"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in VACUUM_THRESHOLDS:
            op.execute(
                f"ALTER TABLE {table} RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold)"
            )
