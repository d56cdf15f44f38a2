"""A process-local cache of "may this user read/write this room" answers, for the WebSocket hot path.

Without it every chat `send` read the membership table (one database round trip per message,
~1 ms of CPU on SQLite). Only "yes" answers are cached (a newly added member is never refused by a
stale "no"), each for at most `ttl_s`. A removal forgets the pair at once in the process that made
it, and in every other process when the hub's `access.revoked` event reaches it (ADR 0056); `ttl_s`
is the bound when that event is lost (a broker may lose events).

A "yes" in use is read again before it expires (ADR 0090): past a point drawn between half and 80 %
of its TTL, the first `take_refresh` for it says so once, and the caller re-reads it in the
background while the cached answer still serves. A sender's every message then finds its answer
here: without it each pair's answer lapsed every TTL, the next message waited for a database read,
and the pairs cached together (every room's first sends) lapsed together, a burst of reads that
held up every message behind it (docs/benchmarks.md, Session 18). The bound does not move: a
re-read extends an entry only while it is still cached (`extend`), so a removal in between wins.
"""

from __future__ import annotations

import random
import time
import uuid

__all__ = ["MembershipCache"]

_Key = tuple[uuid.UUID, str, bool]

# The refresh point, as a share of the TTL: drawn per entry so that pairs cached together are not
# all read again together.
_REFRESH_FROM, _REFRESH_TO = 0.5, 0.8


class MembershipCache:
    def __init__(self, *, ttl_s: float = 5.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        # key -> (expires at, refresh from; inf once its refresh was taken)
        self._expires: dict[_Key, tuple[float, float]] = {}

    def allowed(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> bool:
        """True when a "yes" for the pair is cached and fresh."""
        key = (room_id, user_id, staff)
        entry = self._expires.get(key)
        if entry is None:
            return False
        if entry[0] < time.monotonic():
            self._expires.pop(key, None)
            return False
        return True

    def take_refresh(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> bool:
        """True once for a cached pair past its refresh point: the caller reads it again (and
        `extend`s or `forget`s it). False for a pair not cached, not due, or already taken."""
        key = (room_id, user_id, staff)
        entry = self._expires.get(key)
        if entry is None or entry[1] > time.monotonic():
            return False
        self._expires[key] = (entry[0], float("inf"))
        return True

    def remember(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._expires) >= self.max_entries:
            # Bounded: drop the oldest half (dicts keep insertion order) rather than grow.
            for key in list(self._expires)[: self.max_entries // 2]:
                del self._expires[key]
        self._expires[(room_id, user_id, staff)] = self._entry()

    def extend(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> None:
        """A re-read said "yes": a fresh TTL, if the pair is still cached (not forgotten meanwhile)."""
        key = (room_id, user_id, staff)
        if key in self._expires:
            self._expires[key] = self._entry()

    def _entry(self) -> tuple[float, float]:
        now = time.monotonic()
        return now + self.ttl_s, now + self.ttl_s * random.uniform(_REFRESH_FROM, _REFRESH_TO)

    def forget(self, room_id: uuid.UUID, user_id: str) -> None:
        self._expires.pop((room_id, user_id, False), None)
        self._expires.pop((room_id, user_id, True), None)

    def __len__(self) -> int:
        return len(self._expires)
