"""Identity persistence: users and refresh tokens (this context's tables alone)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.shop.identity.model import EmailTaken, RefreshToken, Role, TokenStatus, User
from mercato.shop.identity.personal import PersonalFields
from mercato.shop.identity.tables import refresh_tokens, users


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
    outside the transaction since it creates the data key) and opened as rows are read."""

    def __init__(self, personal: PersonalFields) -> None:
        self.personal = personal

    async def add_user(self, conn: AsyncConnection, user: User, sealed: dict[str, Any]) -> None:
        """Insert; the unique index on the e-mail's lookup hash is the arbiter when two sign-ups race."""
        try:
            await conn.execute(
                insert(users).values(
                    id=user.id,
                    password_hash=user.password_hash,
                    role=user.role.value,
                    disabled=user.disabled,
                    created_at=user.created_at,
                    updated_at=user.updated_at,
                    **sealed,
                )
            )
        except IntegrityError as exc:
            raise EmailTaken(f"an account with e-mail {user.email} already exists", field="email") from exc

    async def get_user(self, conn: AsyncConnection, user_id: uuid.UUID) -> User | None:
        row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        return (await self._users(conn, [row]))[0] if row else None

    async def get_user_by_email(self, conn: AsyncConnection, email: str) -> User | None:
        lookup = self.personal.email_lookup(email)
        row = (await conn.execute(select(users).where(users.c.email_lookup == lookup))).first()
        return (await self._users(conn, [row]))[0] if row else None

    async def email_exists(self, conn: AsyncConnection, email: str) -> bool:
        lookup = self.personal.email_lookup(email)
        row = (await conn.execute(select(users.c.id).where(users.c.email_lookup == lookup))).first()
        return row is not None

    async def list_users(self, conn: AsyncConnection, user_ids: list[uuid.UUID]) -> list[User]:
        rows = list(await conn.execute(select(users).where(users.c.id.in_(user_ids))))
        return await self._users(conn, rows)

    async def unsealed_rows(self, conn: AsyncConnection, *, limit: int) -> list[Any]:
        """Rows written before personal fields were sealed (plaintext still in `email`)."""
        query = select(users.c.id, users.c.email, users.c.display_name).where(
            users.c.email_sealed.is_(None), users.c.email.is_not(None)
        )
        return list(await conn.execute(query.limit(limit)))

    async def store_sealed(self, conn: AsyncConnection, user_id: uuid.UUID, sealed: dict[str, Any]) -> None:
        await conn.execute(update(users).where(users.c.id == user_id).values(**sealed))

    async def erase(self, conn: AsyncConnection, user_id: uuid.UUID, *, now: datetime) -> bool:
        """Clear the sealed fields and the lookup hash (the address may sign up again), disable."""
        result = await conn.execute(
            update(users)
            .where(users.c.id == user_id)
            .values(
                email=None,
                display_name=None,
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
        opened = await self.personal.open(conn, rows)
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
