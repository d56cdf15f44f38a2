"""The projection checkpoint table: how far each projection has applied each stream partition."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, PrimaryKeyConstraint, String, Table

from mercato.kit.storage import UTCDateTime, metadata

__all__ = ["projection_checkpoints"]

projection_checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("name", String(100), nullable=False),
    # The SQL log is partitioned and offsets are per partition, so "position" is one number per
    # (topic, partition): the offset of the next message this projection will apply.
    Column("topic", String(200), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("name", "topic", "partition"),
)
