"""Engines, connections and transactions for SQLite and PostgreSQL behind one interface."""

from mercato.kit.storage.database import Database, create_database
from mercato.kit.storage.meta import get_meta, set_meta
from mercato.kit.storage.types import UTCDateTime, metadata

__all__ = ["Database", "UTCDateTime", "create_database", "get_meta", "metadata", "set_meta"]
