"""Time-sortable identifiers (UUIDv7, RFC 9562).

UUIDv7 puts a millisecond timestamp in the high bits, so ids sort by creation time, index
well in a B-tree (appends at the right edge) and never expose a database sequence.
"""

from __future__ import annotations

import uuid

from uuid_utils import compat as _uuid_compat

__all__ = ["new_id", "parse_id"]


def new_id() -> uuid.UUID:
    """A new UUIDv7 as a standard-library `uuid.UUID`."""
    return _uuid_compat.uuid7()


# The ids a client may send (hex, hyphens optional): every string it matches, parse_id accepts. Query
# and path parameters carry it, so a client's validator rejects what the server would (ADR 0028).
UUID_PATTERN = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"


def parse_id(value: str) -> uuid.UUID | None:
    """Parse an id from a client; `None` when it is not a valid UUID."""
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None
