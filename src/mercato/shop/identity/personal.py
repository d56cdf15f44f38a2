"""The account's personal fields (e-mail, display name) sealed with its own data key (ADR 0052).

Rows carry `email_lookup` (a keyed hash, for login and uniqueness) and the sealed values; an
erased account's key is gone, so its fields read as empty wherever a copy of the row survives.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.privacy import DataKey, FieldUnreadable, Keyring

__all__ = ["ERASED", "PLAINTEXT_COLUMNS", "READ_SEALED_FLAG", "PersonalColumns", "PersonalFields"]

# What an erased account's fields read as.
ERASED = ""

# The legacy plaintext columns, as processes name them in their version reports (`needs`): the
# contract migration (0028) refuses to drop them while a running process lists one.
PLAINTEXT_COLUMNS = ("identity_users.email", "identity_users.display_name")
# During the rollout, release 1.1 reads the sealed fields only when this flag is on.
READ_SEALED_FLAG = "identity.read_sealed"


class PersonalColumns(StrEnum):
    """Where a release keeps the personal fields, during the rollout of sealing (expand/contract,
    ADRs 0047 and 0052; docs/runbooks/release.md). `MERCATO_RELEASE_IDENTITY_PERSONAL_COLUMNS`.

    plaintext  release 1.0: writes and reads `email`/`display_name` only, finds accounts by `email`
               (works until the contract, 0028; knows nothing of the sealed columns)
    dual       release 1.1: writes both; reads the sealed fields when the flag `identity.read_sealed`
               is on (plaintext for rows the backfill has not reached), else the plaintext ones
               (schema 0027, until the contract)
    sealed     release 1.2 and later: the sealed fields only (from 0027 once backfilled; required
               after the contract)
    """

    PLAINTEXT = "plaintext"
    DUAL = "dual"
    SEALED = "sealed"

    @property
    def needs_plaintext(self) -> bool:
        return self is not PersonalColumns.SEALED

    @property
    def needs(self) -> tuple[str, ...]:
        """What a process of this release lists in its version report's `needs`."""
        return PLAINTEXT_COLUMNS if self.needs_plaintext else ()


class PersonalFields:
    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def email_lookup(self, address: str) -> str:
        return self._keyring.master.lookup_hash("email", address)

    async def sealed_columns(self, user_id: uuid.UUID, *, email: str, display_name: str) -> dict[str, Any]:
        """The sealed columns to store for a new (or legacy) account; creates its data key (or finds the
        one a stopped backfill made)."""
        key = await self._keyring.create(user_id)
        return {
            "email_lookup": self.email_lookup(email),
            "email_sealed": key.seal("email", email),
            "display_name_sealed": key.seal("display_name", display_name),
        }

    async def open(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[tuple[str, str]]:
        """(email, display_name) of each row, in order: plaintext for rows not sealed yet (when the row
        carries the legacy columns), empty for erased accounts."""
        sealed_ids = [row.id for row in rows if row.email_sealed is not None]
        keys = await self._keyring.get_many(sealed_ids, conn=conn) if sealed_ids else {}
        return [self._open_row(row, keys.get(row.id)) for row in rows]

    @staticmethod
    def plaintext(row: Any) -> tuple[str, str]:
        """The legacy columns of a row that carries them (empty once erased, or when the row does not)."""
        return (getattr(row, "email", None) or ERASED, getattr(row, "display_name", None) or ERASED)

    @staticmethod
    def _open_row(row: Any, key: DataKey | None) -> tuple[str, str]:
        if row.email_sealed is None:
            return PersonalFields.plaintext(row)
        if key is None:
            return (ERASED, ERASED)
        try:
            email = key.open("email", row.email_sealed)
            name = key.open("display_name", row.display_name_sealed) if row.display_name_sealed else ERASED
        except FieldUnreadable:
            return (ERASED, ERASED)
        return (email, name)
