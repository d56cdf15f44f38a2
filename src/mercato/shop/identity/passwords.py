"""argon2id password hashing, off the event loop and with bounded concurrency.

One argon2id hash with the default cost takes tens of milliseconds of CPU and 64 MiB of memory.
Run on the event loop it would stall every other request; run on an unbounded thread pool a
burst of logins would take `threads x memory`. So hashing runs in worker threads behind its own
capacity limiter, sized to the CPU count: extra attempts queue instead of thrashing.
"""

from __future__ import annotations

import os

import anyio
import anyio.to_thread
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["PasswordHashing"]

# Verified against for unknown e-mails, so "no such account" costs what "wrong password" costs.
_DUMMY_PASSWORD = "mercato-dummy-password-for-timing"  # noqa: S105 - not a credential


class PasswordHashing:
    def __init__(
        self,
        *,
        time_cost: int,
        memory_kib: int,
        parallelism: int,
        max_concurrent: int | None = None,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._limiter = anyio.CapacityLimiter(max_concurrent or max(2, os.cpu_count() or 2))
        # Computed on first use (in a thread), not at construction: building the container stays cheap.
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._hasher.hash, password, limiter=self._limiter)

    async def verify(self, password_hash: str, password: str) -> bool:
        """True when `password` matches; a malformed stored hash counts as a mismatch, not a crash."""
        return await anyio.to_thread.run_sync(self._verify, password_hash, password, limiter=self._limiter)

    async def warm_up(self) -> None:
        """Make the dummy hash. Every login calls this first, so the one-off cost hits both paths."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(_DUMMY_PASSWORD)

    async def burn(self, password: str) -> None:
        """Spend one verification's worth of work on nothing, to mask that an account is missing."""
        await self.warm_up()
        assert self._dummy_hash is not None
        await self.verify(self._dummy_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash was made with other parameters than the configured ones."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except (InvalidHashError, ValueError):
            return True

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
