"""Chat messages across PostgreSQL shards (ADR 0043): adding a shard under concurrent writes from two
processes moves only the rooms that change owner, loses nothing, duplicates nothing, keeps per-room
order; the running container routes reads and writes through the shard map."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from mercato.bootstrap import build_container
from mercato.config import ChatSettings
from mercato.kit.clock import ManualClock, SystemClock
from mercato.kit.storage import Database, create_database, metadata
from mercato.lab.rebalance_online import run_online_move, scratch_databases
from mercato.shop.chat.rebalance import ChatRebalancer, shard_status
from mercato.shop.chat.shardmap import MAIN, Layout, ShardMap
from mercato.shop.chat.shards import ChatShards
from mercato.shop.chat.tables import messages, shard_fences, shard_map
from tests.conftest import PG_ADMIN_DSN, make_settings
from tests.integration.shop_support import admin, api, customer
from tests.tables import emptiable_tables

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def three_databases() -> AsyncIterator[list[str]]:
    async with scratch_databases(PG_ADMIN_DSN, "hsh_chat", 3) as urls:
        yield urls


async def test_adding_a_shard_online_moves_only_changed_rooms_and_loses_nothing(
    three_databases: list[str],
) -> None:
    main, s1, s2 = three_databases
    result = await run_online_move(
        main, [s1], s2, rooms=40, processes=2, rate_per_room_hz=5.0, warmup_s=0.8, refresh_s=0.2
    )
    assert result.sent > 200, result.sent
    assert result.latency_ms["during"]["n"] > 0, "writes continued while the shard was added"
    assert result.lost == 0
    assert result.duplicated == 0
    assert result.stored == result.sent
    assert sum(result.per_shard_after.values()) == result.sent, "no copy left behind after clean-up"
    assert result.rooms_out_of_order == 0
    assert result.rooms_on_wrong_shard == 0
    # Only rooms whose owner changed moved (≈ 1/3 going 2 -> 3 shards). A room whose first message
    # lands after the last scan is dual-written instead, and verified at clean-up.
    assert 0 < result.report.moved_rooms <= result.owner_changes
    assert 0 < result.owner_changes < result.rooms
    assert result.per_shard_after["s2"] > 0


async def test_the_container_routes_chat_through_the_shard_map(
    pg_url: str, three_databases: list[str], clock: ManualClock
) -> None:
    _, s1, s2 = three_databases
    settings = make_settings(pg_url, chat=ChatSettings(shard_urls=[MAIN, s1], shard_map_refresh_s=0.05))
    container = build_container(settings, clock=clock)
    try:
        assert await ChatRebalancer(container.chat.shards).prepare() == ["s1"]  # as `mercato migrate` does
        chat = container.chat
        rooms = [(await chat.create_room(f"room {i}", ["u1"], created_by="staff")).id for i in range(24)]
        for room in rooms:
            for k in range(3):
                await chat.persist(room, sender="u1", text=f"hi {k}", client_msg_id=f"c{k}")
        current = await chat.shards.current()
        owners = {room: current.route(str(room)).read for room in rooms}
        assert set(owners.values()) == {"s0", "s1"}, "24 rooms over two shards use both"
        for room in rooms:  # each room's rows on its owner only; history reads them from there
            for name in current.names:
                async with chat.shards.db(name, current).read() as conn:
                    n = (
                        await conn.execute(
                            select(func.count()).select_from(messages).where(messages.c.room_id == room)
                        )
                    ).scalar_one()
                assert n == (3 if name == owners[room] else 0)
            assert [m.text for m in await chat.history(room, after=0, limit=10)] == ["hi 0", "hi 1", "hi 2"]
        recent = await chat.recent_messages(sender="u1", limit=100)  # scatter-gather over both shards
        assert len(recent) == 72
        assert len({(m.room_id, m.seq) for m in recent}) == 72

        assert container.signing_keys is not None
        await container.signing_keys.ready()
        async with api(container) as client:  # the operator route: scatter-gather, keyset-paginated
            headers = await admin(container)
            seen: list[tuple[str, int]] = []
            cursor: str | None = None
            while True:
                params: dict[str, str | int] = {"sender": "u1", "limit": 50}
                if cursor:
                    params["cursor"] = cursor
                page = await client.get("/admin/chat/messages", params=params, headers=headers)
                assert page.status_code == 200, page.text
                seen += [(m["room"], m["seq"]) for m in page.json()["items"]]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
            assert len(seen) == 72
            assert len(set(seen)) == 72
            bad = await client.get("/admin/chat/messages", params={"cursor": "bm9wZQ"}, headers=headers)
            assert bad.status_code in (400, 422)
            assert bad.headers["content-type"].startswith("application/problem+json")
            _, customer_headers = await customer(container)
            assert (await client.get("/admin/chat/shards", headers=customer_headers)).status_code == 403
            status_page = await client.get("/admin/chat/shards", headers=headers)
            assert status_page.json()["members"] == ["s0", "s1"]

        report = await ChatRebalancer(chat.shards).add_shard(s2)
        status = await shard_status(chat.shards)
        assert status["members"] == ["s0", "s1", "s2"]
        assert status["rebalancing_to"] is None
        assert sum(s["messages"] for s in status["shards"]) == 72
        assert report.moved_messages == 3 * report.moved_rooms > 0
        for room in rooms:
            assert len(await chat.history(room, after=0, limit=10)) == 3
        registry = container.metrics_registry
        assert (registry.get_sample_value("mercato_chat_shard_writes_total", {"shard": "s1"}) or 0) > 0
        assert registry.get_sample_value("mercato_chat_shard_map_epoch") == status["epoch"]
    finally:
        # The shared test database must not keep a shard map naming the scratch databases dropped
        # after this test: the next container built on it (any later test) would route chat there.
        async with container.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(text(f'DELETE FROM "{table.name}"'))
        await container.close()


async def test_a_writer_with_a_stale_map_is_refused_by_the_fence_and_lands_on_the_new_owner(
    three_databases: list[str],
) -> None:
    main, s1, _ = three_databases
    db = create_database(main)
    made: list[Database] = []

    def connect(url: str) -> Database:
        made.append(create_database(url))
        return made[-1]

    async with db.write() as conn:
        await conn.run_sync(lambda s: metadata.create_all(s, tables=[messages, shard_fences, shard_map]))
    initial = ShardMap.initial([MAIN])
    stale = ChatShards(db, SystemClock(), initial=initial, refresh_s=3600, connect=connect)
    fresh = ChatShards(db, SystemClock(), initial=initial, refresh_s=0.01, connect=connect)
    after = initial.with_target(Layout(("s0", "s1")), add=("s1", s1))
    room = next(r for r in (uuid.uuid4() for _ in range(1000)) if after.route(str(r)).also == "s1")
    try:
        await stale.persist(room, sender="a", text_="one", client_msg_id="1")
        await ChatRebalancer(fresh).add_shard(s1)
        assert (await stale.current()).epoch == 0, "this cache has not seen the new map"
        # It still routes the room to s0; s0 fenced it: the write is refused there and lands on s1.
        message, new = await stale.persist(room, sender="a", text_="two", client_msg_id="2")
        assert new
        assert message.seq == 2
        assert (await stale.current()).route(str(room)).write == "s1"
        horizon = message.sent_at - timedelta(days=1)
        found = await fresh.history(room, after=0, horizon=horizon, limit=9)
        assert [m.text for m in found] == ["one", "two"]
        async with db.read() as conn:  # nothing left on the old owner but the fence
            left = (
                await conn.execute(
                    select(func.count()).select_from(messages).where(messages.c.room_id == room)
                )
            ).scalar_one()
            fence = (await conn.execute(select(shard_fences.c.moved_to))).scalars().all()
        assert left == 0
        assert fence == ["s1"]
    finally:
        for one in made:
            await one.dispose()
        await db.dispose()
