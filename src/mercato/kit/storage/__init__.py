"""Engines, connections and transactions for SQLite and PostgreSQL behind one interface."""

from mercato.kit.storage.commit_guard import CommitGuard, guarded_writes
from mercato.kit.storage.database import Database, create_database
from mercato.kit.storage.meta import get_meta, set_meta
from mercato.kit.storage.replicas import (
    ConsistencyScope,
    ReplicaHook,
    ReplicaSet,
    Staleness,
    consistency_scope,
    format_lsn,
    parse_lsn,
)
from mercato.kit.storage.types import UTCDateTime, metadata

__all__ = [
    "CommitGuard",
    "ConsistencyScope",
    "Database",
    "ReplicaHook",
    "ReplicaSet",
    "Staleness",
    "UTCDateTime",
    "consistency_scope",
    "create_database",
    "format_lsn",
    "get_meta",
    "guarded_writes",
    "metadata",
    "parse_lsn",
    "set_meta",
]
