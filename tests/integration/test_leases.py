"""Leases: one holder at a time, new terms get larger fencing tokens, stale holders are refused."""

from __future__ import annotations

import asyncio

import pytest

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.coordination import LeaseLost, LeaseStore


@pytest.fixture
def leases(container: Container, clock: ManualClock) -> LeaseStore:
    return LeaseStore(container.db, clock)


async def test_one_holder_at_a_time_until_expiry(leases: LeaseStore, clock: ManualClock) -> None:
    first = await leases.acquire("relay", "worker-a", ttl_s=10)
    assert first is not None
    assert first.fencing_token == 1
    assert await leases.acquire("relay", "worker-b", ttl_s=10) is None
    clock.advance(11)
    second = await leases.acquire("relay", "worker-b", ttl_s=10)
    assert second is not None
    assert second.fencing_token == 2


async def test_reacquiring_your_own_live_lease_extends_it_in_the_same_term(
    leases: LeaseStore, clock: ManualClock
) -> None:
    first = await leases.acquire("relay", "worker-a", ttl_s=10)
    clock.advance(5)
    again = await leases.acquire("relay", "worker-a", ttl_s=10)
    assert first is not None
    assert again is not None
    assert again.fencing_token == first.fencing_token
    assert again.expires_at > first.expires_at


async def test_a_stale_holder_cannot_renew_after_a_takeover(leases: LeaseStore, clock: ManualClock) -> None:
    stale = await leases.acquire("saga:1", "runner-a", ttl_s=5)
    assert stale is not None
    clock.advance(6)  # runner-a paused past its lease
    fresh = await leases.acquire("saga:1", "runner-b", ttl_s=5)
    assert fresh is not None
    assert fresh.fencing_token > stale.fencing_token
    with pytest.raises(LeaseLost):
        await leases.renew(stale, ttl_s=5)
    assert not await leases.release(stale)
    renewed = await leases.renew(fresh, ttl_s=5)
    assert renewed.fencing_token == fresh.fencing_token


async def test_release_frees_the_lease_for_the_next_term(leases: LeaseStore) -> None:
    lease = await leases.acquire("job", "a", ttl_s=60)
    assert lease is not None
    assert await leases.release(lease)
    nxt = await leases.acquire("job", "b", ttl_s=60)
    assert nxt is not None
    assert nxt.fencing_token == 2


async def test_concurrent_acquirers_get_exactly_one_lease(leases: LeaseStore) -> None:
    results = await asyncio.gather(*(leases.acquire("leader", f"node-{n}", ttl_s=30) for n in range(12)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    current = await leases.holder("leader")
    assert current is not None
    assert current.holder == winners[0].holder
