"""A process-local cache of "may this user read/write this room" answers, for the WebSocket hot path.

Without it every chat `send` read the membership table (one database round trip per message,
~1 ms of CPU on SQLite). Only "yes" answers are cached (a newly added member is never refused by a
stale "no"), each for at most `ttl_s`. A removal forgets the pair at once in the process that made
it, and in every other process when the hub's `access.revoked` event reaches it (ADR 0056); `ttl_s`
is the bound when that event is lost (a broker may lose events).
"""

from __future__ import annotations

import time
import uuid

__all__ = ["MembershipCache"]

_Key = tuple[uuid.UUID, str, bool]


class MembershipCache:
    def __init__(self, *, ttl_s: float = 5.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._expires: dict[_Key, float] = {}

    def allowed(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> bool:
        """True when a "yes" for the pair is cached and fresh."""
        key = (room_id, user_id, staff)
        expires = self._expires.get(key)
        if expires is None:
            return False
        if expires < time.monotonic():
            self._expires.pop(key, None)
            return False
        return True

    def remember(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._expires) >= self.max_entries:
            # Bounded: drop the oldest half (dicts keep insertion order) rather than grow.
            for key in list(self._expires)[: self.max_entries // 2]:
                del self._expires[key]
        self._expires[(room_id, user_id, staff)] = time.monotonic() + self.ttl_s

    def forget(self, room_id: uuid.UUID, user_id: str) -> None:
        self._expires.pop((room_id, user_id, False), None)
        self._expires.pop((room_id, user_id, True), None)

    def __len__(self) -> int:
        return len(self._expires)
