"""Accounts and access tokens for load generators, made straight in the shop's database.

Thousands of WebSocket clients cannot each register and log in through the API within a bench's set-up
(argon2 per account, sign-up limits per address), and a token for a made-up subject is refused: the bearer
guard checks that its account exists (ADR 0027). So the bench writes the account rows itself and signs
tokens with the shop's own signing keys, read from (or, on a fresh database, created in) the same table
every API process uses (ADR 0036). Needs the server's `MERCATO_AUTH_SECRET`, which seals those keys.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from pydantic import SecretStr

from mercato.bootstrap import build_container
from mercato.config import AuthSettings, DatabaseSettings, Settings
from mercato.kit.auth import Principal
from mercato.shop.identity.model import Role, User

__all__ = ["issue_tokens"]


async def _issue(database_url: str, secret: str, accounts: Sequence[tuple[str, str]]) -> list[str]:
    settings = Settings(
        database=DatabaseSettings(url=database_url), auth=AuthSettings(secret=SecretStr(secret))
    )
    container = build_container(settings)
    try:
        now = container.clock.now()
        for subject, role in accounts:
            await container.identity.store_user(
                User(
                    id=uuid.UUID(subject),
                    email=f"bench-{subject}@example.com",
                    role=Role(role),
                    display_name="Bench",
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                    password_hash="not-a-usable-hash",  # noqa: S106 - no password: tokens only
                ),
            )
        if container.signing_keys is not None:
            await container.signing_keys.ready()
        return [
            container.token_codec.issue(Principal(subject=subject, roles=frozenset({role}))).token
            for subject, role in accounts
        ]
    finally:
        await container.close()


def issue_tokens(database_url: str, secret: str, accounts: Sequence[tuple[str, str]]) -> list[str]:
    """Create an account per `(subject uuid, role)` and return an access token for each, in order."""
    return asyncio.run(_issue(database_url, secret, accounts))
