"""Identity persistence: users and refresh tokens (this context's tables alone)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import String, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import column, literal_column, table

from mercato.shop.identity.model import EmailTaken, RefreshToken, Role, TokenStatus, User
from mercato.shop.identity.tables import refresh_tokens, users


def legacy_table_with(values: dict[str, Any]) -> Any:
    """`identity_users` as a lightweight table naming exactly these columns (incl. the legacy one)."""
    types = {c.name: c.type for c in users.c}
    return table("identity_users", *(column(name, types.get(name, String(100))) for name in values))


class NameColumns(StrEnum):
    """Where a release keeps a user's name, during the column's rename (expand/contract, ADR 0047).

    legacy  release 1.0: `display_name` only (works until the contract, 0023)
    dual    release 1.1: writes both columns; reads `public_name` when the flag
            `identity.read_public_name` is on (falling back to `display_name` for rows the backfill
            has not reached), else `display_name` (needs schema 0022..0023)
    new     release 1.2 and later: `public_name` only (works from 0022 once backfilled; required
            after the contract)
    """

    LEGACY = "legacy"
    DUAL = "dual"
    NEW = "new"

    @property
    def needs_legacy_column(self) -> bool:
        return self is not NameColumns.NEW


LEGACY_NAME_COLUMN = "identity_users.display_name"
READ_PUBLIC_NAME_FLAG = "identity.read_public_name"


def _row_to_user(row: Any) -> User:
    return User(
        id=row.id,
        email=row.email,
        role=Role(row.role),
        display_name=row.name,
        disabled=bool(row.disabled),
        created_at=row.created_at,
        updated_at=row.updated_at,
        password_hash=row.password_hash,
    )


def _row_to_token(row: Any) -> RefreshToken:
    return RefreshToken(
        id=row.id,
        user_id=row.user_id,
        family_id=row.family_id,
        token_hash=row.token_hash,
        status=TokenStatus(row.status),
        issued_at=row.issued_at,
        expires_at=row.expires_at,
        rotated_at=row.rotated_at,
        replaced_by=row.replaced_by,
    )


class IdentityRepository:
    """Queries on `identity_users` and `identity_refresh_tokens`, on the connection given."""

    def __init__(
        self, *, names: NameColumns = NameColumns.NEW, read_public_name: Callable[[], bool] | None = None
    ) -> None:
        self.names = names
        self._read_public_name = read_public_name or (lambda: True)

    def _user_columns(self) -> list[Any]:
        base = [c for c in users.c if c.name != "public_name"]
        # Named as text: the table object does not list it, and a second table object would add a FROM.
        old: Any = literal_column(LEGACY_NAME_COLUMN)
        new: Any = users.c.public_name
        if self.names is NameColumns.NEW:
            name: Any = new
        elif self.names is NameColumns.LEGACY or not self._read_public_name():
            name = old
        else:
            name = func.coalesce(new, old)
        return [*base, name.label("name")]

    def _name_values(self, name: str) -> dict[str, str]:
        if self.names is NameColumns.LEGACY:
            return {"display_name": name}
        if self.names is NameColumns.DUAL:
            return {"display_name": name, "public_name": name}
        return {"public_name": name}

    async def add_user(self, conn: AsyncConnection, user: User) -> None:
        """Insert; the unique index on the normalised e-mail is the arbiter when two sign-ups race."""
        values = {
            "id": user.id,
            "email": user.email,
            "password_hash": user.password_hash,
            "role": user.role.value,
            "disabled": user.disabled,
            "created_at": user.created_at,
            "updated_at": user.updated_at,
            **self._name_values(user.display_name),
        }
        # A name column the table object does not list (the legacy one) needs the lightweight table.
        target = legacy_table_with(values) if self.names.needs_legacy_column else users
        try:
            await conn.execute(insert(target).values(**values))
        except IntegrityError as exc:
            raise EmailTaken(f"an account with e-mail {user.email} already exists", field="email") from exc

    async def get_user(self, conn: AsyncConnection, user_id: uuid.UUID) -> User | None:
        row = (await conn.execute(select(*self._user_columns()).where(users.c.id == user_id))).first()
        return _row_to_user(row) if row else None

    async def get_user_by_email(self, conn: AsyncConnection, email: str) -> User | None:
        row = (await conn.execute(select(*self._user_columns()).where(users.c.email == email))).first()
        return _row_to_user(row) if row else None

    async def email_exists(self, conn: AsyncConnection, email: str) -> bool:
        row = (await conn.execute(select(users.c.id).where(users.c.email == email))).first()
        return row is not None

    async def set_password_hash(self, conn: AsyncConnection, user: User) -> None:
        await conn.execute(
            update(users)
            .where(users.c.id == user.id)
            .values(password_hash=user.password_hash, updated_at=user.updated_at)
        )

    async def set_disabled(
        self, conn: AsyncConnection, user_id: uuid.UUID, *, disabled: bool, now: datetime
    ) -> bool:
        result = await conn.execute(
            update(users).where(users.c.id == user_id).values(disabled=disabled, updated_at=now)
        )
        return result.rowcount == 1

    async def count_users(self, conn: AsyncConnection) -> int:
        return int((await conn.execute(select(func.count()).select_from(users))).scalar_one())

    async def add_refresh_token(self, conn: AsyncConnection, token: RefreshToken) -> None:
        await conn.execute(
            insert(refresh_tokens).values(
                id=token.id,
                user_id=token.user_id,
                family_id=token.family_id,
                token_hash=token.token_hash,
                status=token.status.value,
                issued_at=token.issued_at,
                expires_at=token.expires_at,
                rotated_at=token.rotated_at,
                replaced_by=token.replaced_by,
            )
        )

    async def get_refresh_token(self, conn: AsyncConnection, token_hash: str) -> RefreshToken | None:
        row = (
            await conn.execute(select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash))
        ).first()
        return _row_to_token(row) if row else None

    async def family(self, conn: AsyncConnection, family_id: uuid.UUID) -> list[RefreshToken]:
        rows = await conn.execute(
            select(refresh_tokens)
            .where(refresh_tokens.c.family_id == family_id)
            .order_by(refresh_tokens.c.issued_at, refresh_tokens.c.id)
        )
        return [_row_to_token(r) for r in rows]

    async def mark_rotated(
        self, conn: AsyncConnection, token_id: uuid.UUID, *, replaced_by: uuid.UUID, now: datetime
    ) -> bool:
        """Retire an active token. Conditional on `status = 'active'`, so of two concurrent
        refreshes with one token exactly one sees rowcount 1: PostgreSQL re-checks the predicate
        after the row lock is released, SQLite serialises the writers (BEGIN IMMEDIATE)."""
        result = await conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.id == token_id, refresh_tokens.c.status == TokenStatus.ACTIVE.value)
            .values(status=TokenStatus.ROTATED.value, rotated_at=now, replaced_by=replaced_by)
        )
        return result.rowcount == 1

    async def revoke_family(self, conn: AsyncConnection, family_id: uuid.UUID) -> int:
        result = await conn.execute(
            update(refresh_tokens)
            .where(
                refresh_tokens.c.family_id == family_id,
                refresh_tokens.c.status != TokenStatus.REVOKED.value,
            )
            .values(status=TokenStatus.REVOKED.value)
        )
        return int(result.rowcount)

    async def revoke_user_tokens(self, conn: AsyncConnection, user_id: uuid.UUID) -> int:
        result = await conn.execute(
            update(refresh_tokens)
            .where(
                refresh_tokens.c.user_id == user_id,
                refresh_tokens.c.status != TokenStatus.REVOKED.value,
            )
            .values(status=TokenStatus.REVOKED.value)
        )
        return int(result.rowcount)
