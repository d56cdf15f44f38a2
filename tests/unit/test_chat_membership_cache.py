"""The send path's membership cache (ADR 0056): a "yes" lives at most `ttl_s` (the bound when a
revocation is lost by the broker), `forget` clears it at once, and the cache stays bounded."""

from __future__ import annotations

import time
import uuid

from mercato.shop.chat.membership import MembershipCache


def test_a_yes_expires_after_the_ttl() -> None:
    cache = MembershipCache(ttl_s=0.05)
    room = uuid.uuid4()
    cache.remember(room, "u1", staff=False)
    assert cache.allowed(room, "u1", staff=False)
    assert not cache.allowed(room, "u1", staff=True)  # staff answers are their own entries
    assert not cache.allowed(room, "u2", staff=False)
    time.sleep(0.06)
    assert not cache.allowed(room, "u1", staff=False)
    assert len(cache) == 0


def test_forget_clears_member_and_staff_entries_at_once() -> None:
    cache = MembershipCache(ttl_s=60)
    room, other = uuid.uuid4(), uuid.uuid4()
    cache.remember(room, "u1", staff=False)
    cache.remember(room, "u1", staff=True)
    cache.remember(other, "u1", staff=False)
    cache.forget(room, "u1")
    assert not cache.allowed(room, "u1", staff=False)
    assert not cache.allowed(room, "u1", staff=True)
    assert cache.allowed(other, "u1", staff=False)


def test_the_cache_is_bounded() -> None:
    cache = MembershipCache(ttl_s=60, max_entries=100)
    rooms = [uuid.uuid4() for _ in range(250)]
    for room in rooms:
        cache.remember(room, "u1", staff=False)
    assert len(cache) <= 100
    assert cache.allowed(rooms[-1], "u1", staff=False)  # the newest kept, the oldest dropped
    assert not cache.allowed(rooms[0], "u1", staff=False)


def test_a_zero_ttl_caches_nothing() -> None:
    cache = MembershipCache(ttl_s=0)
    room = uuid.uuid4()
    cache.remember(room, "u1", staff=False)
    assert not cache.allowed(room, "u1", staff=False)
