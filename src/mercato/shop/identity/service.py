"""Identity use cases: sign-up, login, refresh-token rotation, logout, the caller's own account."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mercato.config import AuthSettings
from mercato.kit.auth import Principal, TokenCodec
from mercato.kit.clock import Clock
from mercato.kit.ids import new_id, parse_id
from mercato.kit.privacy import Keyring
from mercato.kit.storage import Database
from mercato.shop.identity.model import (
    AccountUnavailable,
    EmailTaken,
    InvalidCredentials,
    InvalidEmail,
    InvalidRefreshToken,
    RefreshToken,
    RefreshVerdict,
    Role,
    User,
    hash_refresh_token,
    normalise_display_name,
    normalise_email,
    normalise_login_password,
    prepare_password,
    start_family,
)
from mercato.shop.identity.passwords import PasswordHashing
from mercato.shop.identity.personal import PersonalColumns, PersonalFields
from mercato.shop.identity.repository import IdentityRepository
from mercato.shop.identity.sessions import SessionGuard
from mercato.shop.identity.signing_keys import SigningKeyStore

__all__ = ["IdentityService", "TokenPair"]

_REFRESH_REJECTED = "refresh token is invalid, expired or revoked; log in again"
_LOGIN_REJECTED = "e-mail address or password is incorrect"


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "bearer"  # noqa: S105 - the OAuth 2.0 token type, not a secret


class IdentityService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        token_codec: TokenCodec,
        settings: AuthSettings,
        *,
        repository: IdentityRepository | None = None,
        passwords: PasswordHashing | None = None,
        sessions: SessionGuard | None = None,
        signing_keys: SigningKeyStore | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self._db = db
        self._signing_keys = signing_keys
        self._sessions = sessions
        self._clock = clock
        self._codec = token_codec
        self._refresh_ttl_s = settings.refresh_ttl_s
        if keyring is None:
            raise ValueError("IdentityService needs the keyring that seals personal fields")
        self._keyring = keyring
        self._repo = repository or IdentityRepository(PersonalFields(keyring))
        self._passwords = passwords or PasswordHashing(
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )

    async def register(self, email: str, password: str, display_name: str | None = None) -> User:
        """Self-service sign-up: always a customer; other roles come from an admin or the CLI."""
        return await self.create_user(email, password, role=Role.CUSTOMER, display_name=display_name)

    async def create_user(
        self, email: str, password: str, *, role: Role, display_name: str | None = None
    ) -> User:
        address = normalise_email(email)
        secret = prepare_password(password)
        name = normalise_display_name(display_name, email=address)
        # Checked before hashing only to save the CPU on the common case; the unique index still
        # decides when two sign-ups for one address race.
        async with self._db.read() as conn:
            if await self._repo.email_exists(conn, address):
                raise EmailTaken(f"an account with e-mail {address} already exists", field="email")
        password_hash = await self._passwords.hash(secret)
        now = self._clock.now()
        user = User(
            id=new_id(),
            email=address,
            role=role,
            display_name=name,
            disabled=False,
            created_at=now,
            updated_at=now,
            password_hash=password_hash,
        )
        await self.store_user(user)
        return user

    async def store_user(self, user: User) -> None:
        """Insert an account built elsewhere (sign-up, the CLI, load tools), its personal fields sealed
        with a data key of its own; the key is made first, outside the row's transaction."""
        sealed: dict[str, Any] = {}
        if self._repo.columns is not PersonalColumns.PLAINTEXT:  # release 1.0 predates sealing
            sealed = await self._repo.personal.sealed_columns(
                user.id, email=user.email, display_name=user.display_name
            )
        async with self._db.write() as conn:
            await self._repo.add_user(conn, user, sealed)

    async def unsealed(self) -> int:
        """Accounts whose personal fields are still plaintext only (0 once the columns are gone)."""
        async with self._db.read() as conn:
            if not await self._repo.has_plaintext(conn):
                return 0
            return await self._repo.count_unsealed(conn)

    async def seal_legacy(
        self,
        *,
        batch: int = 200,
        max_batches: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """The backfill of the sealing rollout (`mercato backfill sealed-personal-fields`): seal the
        accounts stored with plaintext personal fields only; returns how many this run sealed.

        Batched (the data keys are made first, then one short write transaction per `batch` rows) and
        resumable (it only looks at rows still unsealed, and a key a stopped run made is found again,
        so running it again continues where it was). The plaintext stays for releases still reading it
        until the contract (0028) drops the columns; after that there is nothing to do."""
        done = batches = 0
        while max_batches is None or batches < max_batches:
            async with self._db.read() as conn:
                if not await self._repo.has_plaintext(conn):
                    break
                rows = await self._repo.unsealed_rows(conn, limit=batch)
            if not rows:
                break
            sealed = [
                (
                    row.id,
                    await self._repo.personal.sealed_columns(
                        row.id, email=row.email, display_name=row.display_name or ""
                    ),
                )
                for row in rows
            ]
            async with self._db.write() as conn:
                stored = [await self._repo.store_sealed(conn, user_id, values) for user_id, values in sealed]
            done += sum(stored)
            batches += 1
            if on_batch is not None:
                on_batch(len(rows))
        return done

    async def seal_at_startup(self) -> int:
        """A sealed-only release (1.2+) seals what is left at start-up, as before the rollout existed;
        the releases of the rollout leave it to the backfill command (docs/runbooks/release.md)."""
        if self._repo.columns is not PersonalColumns.SEALED:
            return 0
        return await self.seal_legacy()

    async def erase(self, user_id: uuid.UUID, *, requested_by: str) -> bool:
        """Erasure by crypto-shredding: the account's data key is destroyed first, so every copy of
        its sealed fields (replicas, the event store, backups) is unreadable from that moment; then
        the row's own fields are cleared, the account disabled and its sessions ended. Orders keep
        the customer id and their financial facts. False when there is no such account."""
        async with self._db.read() as conn:
            if await self._repo.get_user(conn, user_id) is None:
                return False
        await self._keyring.shred(user_id, requested_by=requested_by)
        async with self._db.write() as conn:
            await self._repo.erase(conn, user_id, now=self._clock.now())
            await self._repo.revoke_user_tokens(conn, user_id)
        if self._sessions is not None:
            self._sessions.forget_subject(str(user_id))
        return True

    async def purge_refresh_tokens(self, *, batch: int = 1000) -> int:
        async with self._db.write() as conn:
            return await self._repo.purge_refresh_tokens(conn, now=self._clock.now(), batch=batch)

    async def users(self, user_ids: list[uuid.UUID]) -> list[User]:
        async with self._db.read() as conn:
            return await self._repo.list_users(conn, user_ids)

    async def login(self, email: str, password: str) -> TokenPair:
        """Unknown address, wrong password and disabled account fail identically, in about the same
        time: the caller cannot use login to learn which addresses have accounts."""
        await self._passwords.warm_up()
        secret = normalise_login_password(password)
        try:
            address = normalise_email(email)
        except InvalidEmail:
            address = None
        user = None
        if address is not None:
            async with self._db.read() as conn:
                user = await self._repo.get_user_by_email(conn, address)
        if user is None:
            await self._passwords.burn(secret)
            raise InvalidCredentials(_LOGIN_REJECTED)
        if not await self._passwords.verify(user.password_hash, secret) or user.disabled:
            raise InvalidCredentials(_LOGIN_REJECTED)
        if self._passwords.needs_rehash(user.password_hash):
            # The cost settings changed since this hash was made; the plaintext is only at hand now.
            user = user.with_password_hash(await self._passwords.hash(secret), now=self._clock.now())
            async with self._db.write() as conn:
                await self._repo.set_password_hash(conn, user)
        raw, token = self._new_family(user)
        async with self._db.write() as conn:
            await self._repo.add_refresh_token(conn, token)
        return await self._pair(user, raw)

    async def refresh(self, raw_token: str) -> TokenPair:
        """Rotate: retire the presented token and issue its successor in the same family.

        A rotated token presented again, including by the loser of two concurrent refreshes,
        revokes the whole family. Revocation is committed before the 401 is raised, since raising
        inside the transaction would roll it back.
        """
        now = self._clock.now()
        raw_next = secrets.token_urlsafe(32)
        user: User | None = None
        async with self._db.write() as conn:
            current = await self._repo.get_refresh_token(conn, hash_refresh_token(raw_token))
            if current is None:
                raise InvalidRefreshToken(_REFRESH_REJECTED)
            verdict = current.verdict(now)
            if verdict is RefreshVerdict.ROTATE:
                user = await self._repo.get_user(conn, current.user_id)
                if user is None or user.disabled:
                    verdict = RefreshVerdict.REUSED
            if verdict is RefreshVerdict.ROTATE:
                successor = current.successor(
                    token_id=new_id(),
                    token_hash=hash_refresh_token(raw_next),
                    now=now,
                    ttl_s=self._refresh_ttl_s,
                )
                if await self._repo.mark_rotated(conn, current.id, replaced_by=successor.id, now=now):
                    await self._repo.add_refresh_token(conn, successor)
                else:
                    verdict = RefreshVerdict.REUSED
            if verdict is RefreshVerdict.REUSED:
                await self._repo.revoke_family(conn, current.family_id)
        if verdict is not RefreshVerdict.ROTATE or user is None:
            raise InvalidRefreshToken(_REFRESH_REJECTED)
        return await self._pair(user, raw_next)

    async def logout(self, raw_token: str, *, access: Principal | None = None) -> None:
        """Revoke the token's family, and the access token presented with it (when both are the same
        account's) until it expires.
        Unknown tokens are ignored (RFC 7009 §2.2): logging out twice, or with a token that already
        expired, is not an error the client can do anything about."""
        async with self._db.write() as conn:
            current = await self._repo.get_refresh_token(conn, hash_refresh_token(raw_token))
            if current is not None:
                await self._repo.revoke_family(conn, current.family_id)
        # The access token ends with the login it belongs to: only when the refresh token names the
        # same account. Anyone holding someone's access token could otherwise log them out everywhere
        # with a made-up refresh token.
        same_account = current is not None and access is not None and str(current.user_id) == access.subject
        if same_account and access is not None and self._sessions is not None:
            await self._sessions.revoke(access)

    async def me(self, principal: Principal) -> User:
        """The caller's account; a token outliving its account (deleted, disabled) is refused."""
        user_id = parse_id(principal.subject)
        user = None
        if user_id is not None:
            user = await self.get(user_id)
        if user is None or user.disabled:
            raise AccountUnavailable("the account for this access token is unavailable")
        return user

    async def get(self, user_id: uuid.UUID) -> User | None:
        async with self._db.read() as conn:
            return await self._repo.get_user(conn, user_id)

    async def find_by_email(self, email: str) -> User | None:
        try:
            address = normalise_email(email)
        except InvalidEmail:
            return None
        async with self._db.read() as conn:
            return await self._repo.get_user_by_email(conn, address)

    async def set_disabled(self, user_id: uuid.UUID, *, disabled: bool) -> bool:
        """Disabling also revokes every refresh token: the account is out within one access-token TTL."""
        async with self._db.write() as conn:
            found = await self._repo.set_disabled(conn, user_id, disabled=disabled, now=self._clock.now())
            if found and disabled:
                await self._repo.revoke_user_tokens(conn, user_id)
        if self._sessions is not None:
            self._sessions.forget_subject(str(user_id))
        return found

    async def refresh_family(self, raw_token: str) -> list[RefreshToken]:
        """Every token of the family `raw_token` belongs to, oldest first (operators and tests)."""
        async with self._db.read() as conn:
            current = await self._repo.get_refresh_token(conn, hash_refresh_token(raw_token))
            if current is None:
                return []
            return await self._repo.family(conn, current.family_id)

    async def count(self) -> int:
        async with self._db.read() as conn:
            return await self._repo.count_users(conn)

    def _new_family(self, user: User) -> tuple[str, RefreshToken]:
        raw = secrets.token_urlsafe(32)
        token = start_family(
            token_id=new_id(),
            family_id=new_id(),
            user_id=user.id,
            token_hash=hash_refresh_token(raw),
            now=self._clock.now(),
            ttl_s=self._refresh_ttl_s,
        )
        return raw, token

    async def _pair(self, user: User, raw_refresh: str) -> TokenPair:
        if self._signing_keys is not None:
            await self._signing_keys.ready()  # no statement while the keys are fresh
        access = self._codec.issue(user.principal())
        return TokenPair(access_token=access.token, refresh_token=raw_refresh, expires_in=access.expires_in)
