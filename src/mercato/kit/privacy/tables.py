"""The keyring's tables: wrapped data keys, and the record of each erasure.

They may live in the shop's database or in a database of their own (`MERCATO_PRIVACY_KEYRING_URL`):
kept apart, the main database's backups hold no key, so a shredded key stays gone when an old
backup is restored (ADR 0052).
"""

from __future__ import annotations

from sqlalchemy import Column, Index, LargeBinary, String, Table, Uuid

from mercato.kit.storage import UTCDateTime, metadata

subject_keys = Table(
    "privacy_subject_keys",
    metadata,
    Column("subject_id", Uuid, primary_key=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# One row per erased subject, kept for good: proof that the erasure happened and when, and what a
# restore drill checks against. It holds no personal data (the subject id is a random UUID).
erasures = Table(
    "privacy_erasures",
    metadata,
    Column("subject_id", Uuid, primary_key=True),
    Column("erased_at", UTCDateTime, nullable=False),
    Column("requested_by", String(64), nullable=False),
)

# Staff actions: who read or changed what, when. Append-only, enforced by triggers in the database
# (no UPDATE; DELETE only of rows older than the 400-day retention), not by the application.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(16), nullable=False),
    Column("resource", String(300), nullable=False),
    Column("subject_id", Uuid, nullable=True),
    Column("scopes", String(200), nullable=False),
    Column("request_id", String(64), nullable=True),
    Index("ix_audit_log_at", "at"),
    Index("ix_audit_log_actor_at", "actor", "at"),
)
