"""The notifications table: one row per (event, channel), rendered and waiting for a sender."""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Column, Index, String, Table, Text, UniqueConstraint, Uuid

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
    # The last line of defence against a double send: even with the inbox record purged, a
    # redelivered event cannot make a second row for the same channel.
    UniqueConstraint("event_id", "channel"),
    CheckConstraint("channel IN ('email', 'webhook')", name="channel_known"),
    CheckConstraint("status IN ('pending', 'sent', 'failed')", name="status_known"),
    Index("ix_notifications_order_id_id", "order_id", "id"),
)
