"""The identity context's tables."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
    Uuid,
)

from mercato.kit.storage import UTCDateTime, metadata

users = Table(
    "identity_users",
    metadata,
    Column("id", Uuid, primary_key=True),
    # Personal data is sealed with the account's own data key (kit/privacy, ADR 0052): the e-mail is
    # found through `email_lookup`, a keyed hash of the normalised (trimmed, lower-cased) address, so
    # uniqueness stays case-insensitive and the table alone reveals no address. The plaintext `email`
    # and `display_name` of releases before sealing were dropped by the contract step, migration 0028
    # (expand/contract, ADR 0047; repository.py `PersonalColumns` for the releases of the rollout).
    Column("email_lookup", String(64), nullable=True, unique=True),
    Column("email_sealed", LargeBinary, nullable=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("display_name_sealed", LargeBinary, nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    # Set by erasure: the data key is destroyed and the sealed fields cleared; the row stays so that
    # orders keep a customer id for their legal retention period.
    Column("erased_at", UTCDateTime, nullable=True),
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

# Access tokens revoked before their expiry (logout), by `jti`; a row is useless once the token it
# names has expired, so the purge job deletes rows past `expires_at` (ADR 0027).
revoked_tokens = Table(
    "identity_revoked_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=False),
    Index("ix_identity_revoked_tokens_revoked_at", "revoked_at"),
    Index("ix_identity_revoked_tokens_expires_at", "expires_at"),
)

# Partner API keys. Only a keyed hash (HMAC-SHA256 under a server-side key) of each key is stored:
# a leaked table yields neither usable keys nor hashes an attacker can test guesses against offline.
api_keys = Table(
    "identity_api_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", String(100), nullable=False),
    # The key's first characters, shown in listings so an operator can tell keys apart.
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    # Space-separated, like a token's `scope` claim.
    Column("scopes", String(500), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
)


# Access-token signing keys (ADR 0036): the newest generation signs; private halves sealed with
# AES-GCM under a key derived from MERCATO_AUTH_SECRET. `generation` is unique, so two processes
# creating or rotating at once cannot both win.
signing_keys = Table(
    "identity_signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("generation", Integer, nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("sealed_private_key", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime, nullable=True),
    UniqueConstraint("generation", name="uq_identity_signing_keys_generation"),
)
