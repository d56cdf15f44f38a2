"""The real-time tables: the SQL broker's short-lived log, and sequenced channel history."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from mercato.kit.storage import UTCDateTime, metadata

# SQLite only auto-numbers an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
_ID = BigInteger().with_variant(Integer(), "sqlite")

broker_log = Table(
    "realtime_broker_log",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_realtime_broker_log_created_at", "created_at"),
)

channel_history = Table(
    "realtime_channel_history",
    metadata,
    Column("channel", String(200), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("type", String(100), nullable=False),
    Column("data", Text, nullable=False),
    # What the event came from (a message id): appending it again returns its first seq.
    Column("dedup_key", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("channel", "seq", name="pk_realtime_channel_history"),
    UniqueConstraint("channel", "dedup_key", name="uq_realtime_channel_history_dedup"),
)
