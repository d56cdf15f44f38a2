"""ADR 0090: the chat persister's first passes and the membership cache's lapses, the two things
that held up messages in `bench realtime` (docs/benchmarks.md, Session 18).

- The pass's statement is prepared before the first message needs it, on a connection the persister
  holds (the pool handed each pass the next connection in turn, each preparing it again).
- A cached "yes" in use is read again before it expires, in the background: a send never waits for
  the membership read of a pair it keeps using, and a removal the process did not hear of is seen
  at that re-read."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import and_, delete

from mercato.bootstrap import Container
from mercato.gateway.realtime import RealtimeRuntime
from mercato.kit.storage.statements import SharedDriverConnection
from mercato.shop.chat import membership
from mercato.shop.chat.tables import members
from tests.integration.statement_budget import counting


async def test_the_runtime_prepares_the_persisting_pass_before_the_first_message(
    container: Container,
) -> None:
    if container.db.dialect != "postgresql":
        pytest.skip("the pass is one prepared call on PostgreSQL only (migration 0029)")
    runtime = RealtimeRuntime(container)
    with counting(container) as tally:
        await runtime.start()
        try:
            for _ in range(250):
                if any("CHAT_PERSIST_PASS(" in s.upper() for s in tally.statements):
                    break
                await asyncio.sleep(0.02)
        finally:
            await runtime.stop()
    passes = [s for s in tally.statements if "CHAT_PERSIST_PASS(" in s.upper()]
    # No message was sent: the one call is the empty one that prepares the statement and the function.
    assert len(passes) == 1, tally.report()


async def test_a_held_driver_connection_stays_out_of_the_pool_until_closed(container: Container) -> None:
    pool = container.db.engine.pool
    before = pool.checkedout()  # type: ignore[attr-defined]
    held = SharedDriverConnection(container.db, hold=True)
    async with held.use() as first:
        pass
    for _ in range(3):
        await asyncio.sleep(0)  # an unheld one goes back to the pool here
    assert pool.checkedout() == before + 1  # type: ignore[attr-defined]
    async with held.use() as second:
        assert second is first
    await held.close()
    assert pool.checkedout() == before  # type: ignore[attr-defined]


async def test_a_member_removed_behind_the_cache_is_refused_at_its_re_read_not_its_ttl(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "_REFRESH_FROM", 0.0)  # due at once; the TTL stays 5 s
    monkeypatch.setattr(membership, "_REFRESH_TO", 0.0)
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("refresh", users, created_by=users[0])).id
    assert await chat.may_read(room, users[1], staff=False)  # read and cached
    # Removed without this process hearing of it (a revocation the broker lost): the row goes, the
    # cached "yes" stays.
    async with container.db.write() as conn:
        await conn.execute(
            delete(members).where(and_(members.c.room_id == room, members.c.user_id == users[1]))
        )
    assert await chat.may_read(room, users[1], staff=False)  # answered at once; the re-read starts
    for _ in range(100):
        if not chat.membership.allowed(room, users[1], staff=False):
            break
        await asyncio.sleep(0.02)
    assert not await chat.may_read(room, users[1], staff=False)  # well within the 5 s TTL
    assert await chat.may_read(room, users[0], staff=False)


async def test_closing_the_chat_service_stops_the_re_reads_in_flight_before_its_databases_go(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(membership, "_REFRESH_FROM", 0.0)
    monkeypatch.setattr(membership, "_REFRESH_TO", 0.0)
    chat = container.chat
    user = str(uuid.uuid4())
    room = (await chat.create_room("closing", [user], created_by=user)).id
    assert await chat.may_read(room, user, staff=False)
    assert await chat.may_read(room, user, staff=False)  # cached; its re-read starts in the background
    (rereading,) = chat._refreshing
    await chat.close()
    # Cancelled, not left to fail on a disposed database (and log it) after the process closed it.
    assert rereading.cancelled()
    assert not chat._refreshing


async def test_the_runtime_stops_every_time_it_is_stopped_in_its_first_statements(
    container: Container,
) -> None:
    """Stopped while its first statements are in flight (the warm-up call, the broker's first poll),
    the runtime stops. A cancellation landing mid-statement invalidated the connection, its rollback
    then raised instead, and the SQL broker's poll took that for a failed poll and polled on: the
    hub's stop waited for ever (1 start in 7-130 here before the fix, and a CI run's 300-s timeout)."""
    for attempt in range(150):
        runtime = RealtimeRuntime(container)
        with counting(container) as tally:
            await runtime.start()
            for _ in range(100):
                if len(tally.statements) >= 1 + attempt % 4:  # stop at a different point each time
                    break
                await asyncio.sleep(0.002)
            try:
                await asyncio.wait_for(asyncio.shield(runtime.stop()), timeout=20)
            except TimeoutError:
                pytest.fail(f"the runtime's stop hung (start {attempt + 1})")
