"""The event store's tables: one append-only event log for every stream, and snapshots."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)

from mercato.kit.storage import UTCDateTime, metadata

# SQLite only auto-assigns an `INTEGER PRIMARY KEY` (its rowid); PostgreSQL gets a BIGSERIAL.
POSITION_TYPE = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "eventstore_events",
    metadata,
    # The global position: the order subscriptions and full replays read the whole log in.
    Column("position", POSITION_TYPE, primary_key=True, autoincrement=True),
    Column("stream_id", String(200), nullable=False),
    # 1 for a stream's first event; a stream's versions are gapless.
    Column("version", Integer, nullable=False),
    Column("type", String(200), nullable=False),
    Column("data", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    # The optimistic-concurrency guard: two writers that decided on the same version cannot both
    # commit; the index also serves `load(stream_id, after_version)`.
    UniqueConstraint("stream_id", "version"),
    CheckConstraint("version >= 1", name="version_positive"),
)

snapshots = Table(
    "eventstore_snapshots",
    metadata,
    Column("stream_id", String(200), nullable=False),
    # The version of the last event folded into `state`.
    Column("version", Integer, nullable=False),
    Column("state", JSON, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("stream_id", "version"),
)
