"""The versioned runtime-configuration document and the processes' version reports (ADR 0045)."""

from __future__ import annotations

from sqlalchemy import Column, Integer, PrimaryKeyConstraint, String, Table, Text

from mercato.kit.storage import UTCDateTime, metadata

__all__ = ["runtime_config_versions", "runtime_processes"]

# Append-only: every accepted document is a new row; a rollback is a new row carrying an old document.
runtime_config_versions = Table(
    "runtime_config_versions",
    metadata,
    Column("version", Integer, nullable=False, autoincrement=False),
    Column("document", Text, nullable=False),  # canonical JSON (sorted keys)
    Column("checksum", String(64), nullable=False),  # sha256 of `document`
    Column("author", String(200), nullable=False),
    Column("comment", String(500), nullable=False),
    Column("action", String(20), nullable=False),  # set | rollback
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("version"),
)

# One row per running process: what it runs (code version, config version), refreshed every poll.
runtime_processes = Table(
    "runtime_processes",
    metadata,
    Column("process_id", String(200), nullable=False),
    Column("role", String(40), nullable=False),
    Column("app_version", String(60), nullable=False),
    Column("config_version", Integer, nullable=False),
    # Schema objects this process's code still uses that a contract migration would drop (comma list).
    Column("needs", String(500), nullable=False, default=""),
    Column("started_at", UTCDateTime, nullable=False),
    Column("seen_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("process_id"),
)
