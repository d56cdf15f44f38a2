"""The chat context's tables: rooms, their members, and messages with a per-room sequence."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
)

from mercato.kit.storage import UTCDateTime, metadata

rooms = Table(
    "chat_rooms",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", String(200), nullable=False),
    # "support" (one per order: its customer + staff) or "group" (created by staff).
    Column("kind", String(16), nullable=False),
    Column("order_id", Uuid, nullable=True, unique=True),
    Column("created_by", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

members = Table(
    "chat_members",
    metadata,
    Column("room_id", Uuid, nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("joined_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("room_id", "user_id", name="pk_chat_members"),
)

messages = Table(
    "chat_messages",
    metadata,
    Column("room_id", Uuid, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("sender", String(64), nullable=False),
    Column("text", Text, nullable=False),
    Column("client_msg_id", String(100), nullable=False),
    Column("sent_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("room_id", "seq", name="pk_chat_messages"),
    # A client re-sending after a lost ack gets its first seq back, not a second message.
    UniqueConstraint("room_id", "sender", "client_msg_id", name="uq_chat_messages_client_msg"),
    # The retention job (workers/jobs.py: purge_chat_history) deletes by age.
    Index("ix_chat_messages_sent_at", "sent_at"),
)

# Sharding (ADR 0043). In every shard: a room whose messages moved away is fenced here, so a writer
# with a stale shard map is refused in the statement (never a message left behind on the old shard).
shard_fences = Table(
    "chat_shard_fences",
    metadata,
    Column("room_id", Uuid, primary_key=True),
    Column("moved_to", String(64), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("fenced_at", UTCDateTime, nullable=False),
)

# In the main database only: the shard map (one row), read by every process and cached briefly.
shard_map = Table(
    "chat_shard_map",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("epoch", Integer, nullable=False),
    Column("body", Text, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
