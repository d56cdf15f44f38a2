"""What a validly signed credential must still pass: the checks a signature cannot make.

A JWT proves who issued it and until when it is valid, not that it is still wanted: a logged-out
token, or one whose subject was deleted or disabled, verifies as well as any other. A `TokenGuard`
holds that state (a revocation list, the subjects that exist) and is asked after verification.
"""

from __future__ import annotations

from typing import Protocol

from mercato.kit.auth.tokens import Principal

__all__ = ["CredentialVerifier", "TokenGuard"]


class TokenGuard(Protocol):
    async def admit(self, principal: Principal) -> None:
        """Return when the verified `principal` may act; raise `InvalidToken` when it may not."""
        ...


class CredentialVerifier(Protocol):
    async def authenticate(self, raw: str) -> Principal | None:
        """The principal an opaque credential (an API key) stands for; None when unknown or revoked."""
        ...
