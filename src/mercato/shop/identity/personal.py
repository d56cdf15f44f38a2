"""The account's personal fields (e-mail, display name) sealed with its own data key (ADR 0052).

Rows carry `email_lookup` (a keyed hash, for login and uniqueness) and the sealed values; an
erased account's key is gone, so its fields read as empty wherever a copy of the row survives.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.privacy import DataKey, FieldUnreadable, Keyring

__all__ = ["ERASED", "PersonalFields"]

# What an erased account's fields read as.
ERASED = ""


class PersonalFields:
    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def email_lookup(self, address: str) -> str:
        return self._keyring.master.lookup_hash("email", address)

    async def sealed_columns(self, user_id: uuid.UUID, *, email: str, display_name: str) -> dict[str, Any]:
        """The columns to store for a new (or legacy) account; creates its data key."""
        key = await self._keyring.create(user_id)
        return {
            "email": None,
            "display_name": None,
            "email_lookup": self.email_lookup(email),
            "email_sealed": key.seal("email", email),
            "display_name_sealed": key.seal("display_name", display_name),
        }

    async def open(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[tuple[str, str]]:
        """(email, display_name) of each row, in order: plaintext for rows not sealed yet, empty for
        erased accounts."""
        sealed_ids = [row.id for row in rows if row.email_sealed is not None]
        keys = await self._keyring.get_many(sealed_ids, conn=conn) if sealed_ids else {}
        return [self._open_row(row, keys.get(row.id)) for row in rows]

    @staticmethod
    def _open_row(row: Any, key: DataKey | None) -> tuple[str, str]:
        if row.email_sealed is None:
            return (row.email or ERASED, row.display_name or ERASED)
        if key is None:
            return (ERASED, ERASED)
        try:
            email = key.open("email", row.email_sealed)
            name = key.open("display_name", row.display_name_sealed) if row.display_name_sealed else ERASED
        except FieldUnreadable:
            return (ERASED, ERASED)
        return (email, name)
