"""The send path's membership cache (ADR 0056): a "yes" lives at most `ttl_s` (the bound when a
revocation is lost by the broker), `forget` clears it at once, and the cache stays bounded; a "yes"
in use is read again before it expires (ADR 0090)."""

from __future__ import annotations

import time
import uuid

import pytest

from mercato.shop.chat import membership
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


def test_a_yes_in_use_is_offered_for_a_refresh_once_before_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ADR 0090: past its refresh point (here at once) a cached "yes" still answers, and the first
    caller to ask is told to read it again; the others are not, until a re-read extends it."""
    monkeypatch.setattr(membership, "_REFRESH_FROM", 0.0)
    monkeypatch.setattr(membership, "_REFRESH_TO", 0.0)
    cache = MembershipCache(ttl_s=60)
    room = uuid.uuid4()
    assert not cache.take_refresh(room, "u1", staff=False)  # not cached: nothing to refresh
    cache.remember(room, "u1", staff=False)
    assert cache.allowed(room, "u1", staff=False)
    assert cache.take_refresh(room, "u1", staff=False)
    assert not cache.take_refresh(room, "u1", staff=False)  # one re-read in flight, not one per message
    assert cache.allowed(room, "u1", staff=False)  # still answers while it is read again
    cache.extend(room, "u1", staff=False)
    assert cache.take_refresh(room, "u1", staff=False)  # a new refresh point (at once, patched)


def test_the_refresh_point_is_drawn_within_the_ttl_and_not_before_half_of_it() -> None:
    cache = MembershipCache(ttl_s=60)
    room = uuid.uuid4()
    cache.remember(room, "u1", staff=False)
    assert not cache.take_refresh(room, "u1", staff=False)  # not due before half the TTL


def test_a_re_read_does_not_bring_back_a_pair_forgotten_meanwhile() -> None:
    cache = MembershipCache(ttl_s=60)
    room = uuid.uuid4()
    cache.remember(room, "u1", staff=False)
    cache.forget(room, "u1")  # the member was removed while the re-read was in flight
    cache.extend(room, "u1", staff=False)  # that re-read's "yes" came from before the removal
    assert not cache.allowed(room, "u1", staff=False)
