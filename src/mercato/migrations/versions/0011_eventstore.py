"""Event store: the append-only event log (global position, unique stream version) and snapshots.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mercato.kit.storage import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eventstore_events",
        # INTEGER on SQLite so the column is the rowid (auto-assigned); BIGSERIAL on PostgreSQL.
        sa.Column(
            "position",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_eventstore_events"),
        sa.UniqueConstraint("stream_id", "version", name="uq_eventstore_events_stream_id_version"),
        sa.CheckConstraint("version >= 1", name="ck_eventstore_events_version_positive"),
    )
    op.create_table(
        "eventstore_snapshots",
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("stream_id", "version", name="pk_eventstore_snapshots"),
    )


def downgrade() -> None:
    op.drop_table("eventstore_snapshots")
    op.drop_table("eventstore_events")
