"""Identity persistence: users and refresh tokens (this context's tables alone)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import LargeBinary, String, Uuid, delete, func, insert, inspect, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import column, literal_column, table

from mercato.shop.identity.model import EmailTaken, RefreshToken, Role, TokenStatus, User
from mercato.shop.identity.personal import PersonalColumns, PersonalFields
from mercato.shop.identity.tables import refresh_tokens, users

# The legacy plaintext columns are not in the declared table (migration 0028 drops them): releases that
# still use them name them through this lightweight table in statements on it alone, and as text beside
# `users`' own columns (a second table object would add a second FROM).
legacy = table(
    "identity_users",
    column("id", Uuid),
    column("email", String(254)),
    column("display_name", String(100)),
    column("email_sealed", LargeBinary),
)
# What release 1.0 knew of the table: it runs on the schema before the expand (0021) too.
_BASE = ("id", "password_hash", "role", "disabled", "created_at", "updated_at")
_plain_email: Any = literal_column("identity_users.email", String(254))
_plain_name: Any = literal_column("identity_users.display_name", String(100))


def _row_to_user(row: Any, email: str, display_name: str) -> User:
    return User(
        id=row.id,
        email=email,
        role=Role(row.role),
        display_name=display_name,
        disabled=bool(row.disabled),
        created_at=row.created_at,
        updated_at=row.updated_at,
        password_hash=row.password_hash,
    )


def _table_with(values: dict[str, Any]) -> Any:
    """`identity_users` as a lightweight table naming exactly these columns (incl. legacy ones)."""
    types = {**{c.name: c.type for c in users.c}, **{c.name: c.type for c in legacy.c}}
    return table("identity_users", *(column(name, types[name]) for name in values))


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


# Not an argon2 encoding: no password verifies against it.
ERASED_PASSWORD_HASH = "!erased"  # noqa: S105


class IdentityRepository:
    """Queries on `identity_users` and `identity_refresh_tokens`, on the connection given.

    Personal fields are sealed before they are written (`sealed_columns`, made by the service
    outside the transaction since it creates the data key) and opened as rows are read. Where they are
    kept follows the release's `PersonalColumns` (the expand/contract rollout, ADR 0047); `read_sealed`
    is the flag `identity.read_sealed`, asked on every read by a dual-writing release."""

    def __init__(
        self,
        personal: PersonalFields,
        *,
        columns: PersonalColumns = PersonalColumns.SEALED,
        read_sealed: Callable[[], bool] | None = None,
    ) -> None:
        self.personal = personal
        self.columns = columns
        self._read_sealed = read_sealed or (lambda: True)

    def _reads_sealed(self) -> bool:
        if self.columns is PersonalColumns.DUAL:
            return self._read_sealed()
        return self.columns is PersonalColumns.SEALED

    def _user_columns(self) -> list[Any]:
        if self.columns is PersonalColumns.SEALED:
            return list(users.c)
        plaintext = [_plain_email.label("email"), _plain_name.label("display_name")]
        if self.columns is PersonalColumns.PLAINTEXT:
            return [*(users.c[name] for name in _BASE), *plaintext]
        return [*users.c, *plaintext]

    def _by_email(self, address: str) -> Any:
        if self.columns is PersonalColumns.SEALED:
            return users.c.email_lookup == self.personal.email_lookup(address)
        if not self._reads_sealed():
            return _plain_email == address
        # Rows the backfill has not reached yet are found by their plaintext address.
        return or_(users.c.email_lookup == self.personal.email_lookup(address), _plain_email == address)

    async def add_user(self, conn: AsyncConnection, user: User, sealed: dict[str, Any]) -> None:
        """Insert; the unique index on the e-mail's lookup hash (and, while it exists, on the plaintext
        address) is the arbiter when two sign-ups race."""
        values: dict[str, Any] = {
            "id": user.id,
            "password_hash": user.password_hash,
            "role": user.role.value,
            "disabled": user.disabled,
            "created_at": user.created_at,
            "updated_at": user.updated_at,
        }
        if self.columns is not PersonalColumns.PLAINTEXT:
            values.update(sealed)
        if self.columns.needs_plaintext:
            values.update(email=user.email, display_name=user.display_name)
        target = users if not self.columns.needs_plaintext else _table_with(values)
        try:
            await conn.execute(insert(target).values(**values))
        except IntegrityError as exc:
            raise EmailTaken(f"an account with e-mail {user.email} already exists", field="email") from exc

    async def get_user(self, conn: AsyncConnection, user_id: uuid.UUID) -> User | None:
        row = (await conn.execute(select(*self._user_columns()).where(users.c.id == user_id))).first()
        return (await self._users(conn, [row]))[0] if row else None

    async def get_user_by_email(self, conn: AsyncConnection, email: str) -> User | None:
        row = (await conn.execute(select(*self._user_columns()).where(self._by_email(email)))).first()
        return (await self._users(conn, [row]))[0] if row else None

    async def email_exists(self, conn: AsyncConnection, email: str) -> bool:
        row = (await conn.execute(select(users.c.id).where(self._by_email(email)))).first()
        return row is not None

    async def list_users(self, conn: AsyncConnection, user_ids: list[uuid.UUID]) -> list[User]:
        query = select(*self._user_columns()).where(users.c.id.in_(user_ids))
        return await self._users(conn, list(await conn.execute(query)))

    @staticmethod
    async def has_plaintext(conn: AsyncConnection) -> bool:
        """Whether the legacy columns are still there (they are gone after the contract, 0028)."""

        def names(sync: Any) -> set[str]:
            return {c["name"] for c in inspect(sync).get_columns("identity_users")}

        return "email" in await conn.run_sync(names)

    _UNSEALED = (legacy.c.email_sealed.is_(None), legacy.c.email.is_not(None))

    async def unsealed_rows(self, conn: AsyncConnection, *, limit: int) -> list[Any]:
        """Rows no release has sealed yet (plaintext only), in id order; call only while
        `has_plaintext`."""
        query = select(legacy.c.id, legacy.c.email, legacy.c.display_name).where(*self._UNSEALED)
        return list(await conn.execute(query.order_by(legacy.c.id).limit(limit)))

    async def count_unsealed(self, conn: AsyncConnection) -> int:
        query = select(func.count()).select_from(legacy).where(*self._UNSEALED)
        return int((await conn.execute(query)).scalar_one())

    async def store_sealed(self, conn: AsyncConnection, user_id: uuid.UUID, sealed: dict[str, Any]) -> bool:
        """Add the sealed fields to a legacy row, unless another run (or an erasure) got there first.
        The plaintext stays for the releases still reading it; the contract drops it."""
        result = await conn.execute(
            update(users).where(users.c.id == user_id, users.c.email_sealed.is_(None)).values(**sealed)
        )
        return result.rowcount == 1

    async def erase(self, conn: AsyncConnection, user_id: uuid.UUID, *, now: datetime) -> bool:
        """Clear the sealed fields and the lookup hash (the address may sign up again), disable; and the
        plaintext copy wherever the legacy columns still exist, whatever this release uses."""
        if self.columns.needs_plaintext or await self.has_plaintext(conn):
            await conn.execute(
                update(legacy).where(legacy.c.id == user_id).values(email=None, display_name=None)
            )
        result = await conn.execute(
            update(users)
            .where(users.c.id == user_id)
            .values(
                email_lookup=None,
                email_sealed=None,
                display_name_sealed=None,
                password_hash=ERASED_PASSWORD_HASH,
                disabled=True,
                erased_at=now,
                updated_at=now,
            )
        )
        return result.rowcount == 1

    async def _users(self, conn: AsyncConnection, rows: list[Any]) -> list[User]:
        if self._reads_sealed():
            opened = await self.personal.open(conn, rows)
        else:
            opened = [self.personal.plaintext(row) for row in rows]
        return [_row_to_user(row, email, name) for row, (email, name) in zip(rows, opened, strict=True)]

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

    async def purge_refresh_tokens(self, conn: AsyncConnection, *, now: datetime, batch: int) -> int:
        """Delete refresh tokens past their expiry: refused by then whatever their status."""
        ids = (
            select(refresh_tokens.c.id)
            .where(refresh_tokens.c.expires_at < now)
            .limit(batch)
            .scalar_subquery()
        )
        result = await conn.execute(delete(refresh_tokens).where(refresh_tokens.c.id.in_(ids)))
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
