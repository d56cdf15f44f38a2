"""The identity context's tables."""

from __future__ import annotations

from sqlalchemy import Boolean, CheckConstraint, Column, ForeignKey, Index, String, Table, Uuid

from mercato.kit.storage import UTCDateTime, metadata

users = Table(
    "identity_users",
    metadata,
    Column("id", Uuid, primary_key=True),
    # Stored normalised (trimmed, lower-cased) so uniqueness is case-insensitive on every backend.
    Column("email", String(254), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("display_name", String(100), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("role IN ('customer', 'admin', 'service')", name="role_known"),
)

refresh_tokens = Table(
    "identity_refresh_tokens",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("identity_users.id", ondelete="CASCADE"), nullable=False),
    # Every token descends from one login; reuse of a rotated token revokes the whole family.
    Column("family_id", Uuid, nullable=False),
    # SHA-256 of the opaque token: a database leak yields no usable refresh token.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("rotated_at", UTCDateTime, nullable=True),
    Column("replaced_by", Uuid, nullable=True),
    CheckConstraint("status IN ('active', 'rotated', 'revoked')", name="status_known"),
    Index("ix_identity_refresh_tokens_family_id", "family_id"),
    Index("ix_identity_refresh_tokens_user_id", "user_id"),
)
