"""The notifications table: one row per (event, channel), rendered and waiting for a sender.

Delivery state (`attempts`, `last_error`, `next_attempt_at`, `sent_at`) is kept by the notifier
(`delivery.py`): `next_attempt_at` is both the retry backoff and the claim lease of a sender.
"""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Column, Index, Integer, String, Table, Text, UniqueConstraint, Uuid

from mercato.kit.storage import UTCDateTime, metadata

notifications = Table(
    "notifications",
    metadata,
    Column("id", Uuid, primary_key=True),
    # The integration event's id: with the channel, what makes a notification unique.
    Column("event_id", Uuid, nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("order_id", Uuid, nullable=False),
    Column("recipient", String(200), nullable=False),
    Column("subject", String(300), nullable=False),
    Column("body", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("sent_at", UTCDateTime, nullable=True),
    # The last line of defence against a double send: even with the inbox record purged, a
    # redelivered event cannot make a second row for the same channel.
    UniqueConstraint("event_id", "channel"),
    CheckConstraint("channel IN ('email', 'webhook')", name="channel_known"),
    CheckConstraint("status IN ('pending', 'sent', 'failed')", name="status_known"),
    Index("ix_notifications_order_id_id", "order_id", "id"),
    Index("ix_notifications_status_next_attempt_at", "status", "next_attempt_at"),
)
