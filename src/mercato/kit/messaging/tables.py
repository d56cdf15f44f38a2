"""The messaging tables: outbox, the embedded stream (log, heads, group cursors, attempts), DLQ, inbox."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)

from mercato.kit.storage import UTCDateTime, metadata

outbox = Table(
    "messaging_outbox",
    metadata,
    # The message id (UUIDv7): id order is creation order, the relay's publishing order.
    Column("id", Uuid, primary_key=True),
    Column("topic", String(200), nullable=False),
    Column("key", String(200), nullable=False),
    Column("type", String(200), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # A relay's short lease on a row while it publishes; expired leases are taken over.
    Column("claimed_until", UTCDateTime, nullable=True),
    Column("claim_token", Uuid, nullable=True),
    Column("published_at", UTCDateTime, nullable=True),
    # Partial indexes: the unpublished rows are few, the published history is large.
    Index(
        "ix_messaging_outbox_unpublished_id",
        "id",
        postgresql_where=text("published_at IS NULL"),
        sqlite_where=text("published_at IS NULL"),
    ),
    Index(
        "ix_messaging_outbox_unpublished_key_id",
        "key",
        "id",
        postgresql_where=text("published_at IS NULL"),
        sqlite_where=text("published_at IS NULL"),
    ),
    Index("ix_messaging_outbox_published_at", "published_at"),
)

stream_heads = Table(
    "messaging_stream_heads",
    metadata,
    Column("topic", String(200), nullable=False),
    Column("partition", Integer, nullable=False),
    # The offset the next appended message gets; its row lock serializes appends to a partition,
    # so offsets commit in order and a reader never sees offset n+1 before n.
    Column("next_offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("topic", "partition"),
)

stream_log = Table(
    "messaging_stream_log",
    metadata,
    Column("topic", String(200), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("message_id", Uuid, nullable=False),
    Column("key", String(200), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("appended_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("topic", "partition", "offset"),
    # Publishing the same message twice (a relay retry) is a no-op.
    UniqueConstraint("message_id"),
    Index("ix_messaging_stream_log_topic_appended_at", "topic", "appended_at"),
)

stream_cursors = Table(
    "messaging_stream_cursors",
    metadata,
    Column("group", String(100), nullable=False),
    Column("topic", String(200), nullable=False),
    Column("partition", Integer, nullable=False),
    # Every offset below it is acknowledged (or dead-lettered).
    Column("next_offset", BigInteger, nullable=False),
    # [next_offset, batch_end) is delivered and not yet acknowledged.
    Column("batch_end", BigInteger, nullable=False),
    Column("owner", String(200), nullable=True),
    # While a batch is out: its visibility deadline. Otherwise: no delivery before it (nack backoff).
    Column("lease_until", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("group", "topic", "partition"),
)

stream_attempts = Table(
    "messaging_stream_attempts",
    metadata,
    Column("group", String(100), nullable=False),
    Column("topic", String(200), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("acked", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    PrimaryKeyConstraint("group", "topic", "partition", "offset"),
)

dead_letters = Table(
    "messaging_dead_letters",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("group", String(100), nullable=False),
    Column("topic", String(200), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("message_id", Uuid, nullable=False),
    Column("type", String(200), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("dead_at", UTCDateTime, nullable=False),
    # dead -> replaying (queued for its group again) -> replayed (acknowledged) | dead (failed again).
    Column("status", String(16), nullable=False),
    Column("visible_at", UTCDateTime, nullable=True),
    Column("replayed_at", UTCDateTime, nullable=True),
    CheckConstraint("status IN ('dead', 'replaying', 'replayed')", name="status_known"),
    Index("ix_messaging_dead_letters_group_status_id", "group", "status", "id"),
    Index("ix_messaging_dead_letters_topic_id", "topic", "id"),
)

inbox = Table(
    "messaging_inbox",
    metadata,
    Column("consumer", String(100), nullable=False),
    Column("message_id", Uuid, nullable=False),
    Column("processed_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("consumer", "message_id"),
    Index("ix_messaging_inbox_processed_at", "processed_at"),
)
