"""The chat offline queue is bounded by its TTL (MERCATO_REALTIME_HISTORY_TTL_S): the worker's
`purge_chat_history` job deletes messages older than it, on SQLite and PostgreSQL, and a room's
seqs never start over (its newest message is kept, out of history's reach, until a newer one comes)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.shop.chat.tables import messages
from mercato.workers import shop_jobs

DAY = 86_400.0


async def stored(container: Container, room: uuid.UUID) -> list[int]:
    async with container.db.read() as conn:
        rows = await conn.execute(
            select(messages.c.seq).where(messages.c.room_id == room).order_by(messages.c.seq)
        )
        return [int(s) for s in rows.scalars()]


async def test_the_worker_purges_chat_messages_past_the_ttl(container: Container, clock: ManualClock) -> None:
    chat = container.chat
    ttl = container.settings.realtime.history_ttl_s
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("retention", users, created_by=users[0])).id
    other = (await chat.create_room("other", users, created_by=users[0])).id
    for n in range(5):
        await chat.persist(room, sender=users[0], text=f"old {n}", client_msg_id=f"old-{n}")
    await chat.persist(other, sender=users[1], text="lonely", client_msg_id="lonely")
    clock.advance(ttl / 2)
    for n in range(3):
        await chat.persist(room, sender=users[1], text=f"new {n}", client_msg_id=f"new-{n}")

    job = {j.name: j for j in shop_jobs(container)}["purge_chat_history"]
    assert await job.run() == 0  # nothing is past the TTL yet
    assert await stored(container, room) == list(range(1, 9))

    clock.advance(ttl / 2 + 1)  # the first five are past it, the last three are not
    assert await job.run() == 5
    assert await stored(container, room) == [6, 7, 8]
    # The other room's only message is past the TTL too, but it is its head: kept, not served.
    assert await stored(container, other) == [1]
    assert await chat.history(other, after=0, limit=10) == []
    assert [m.seq for m in await chat.history(room, after=0, limit=10)] == [6, 7, 8]
    assert await job.run() == 0

    clock.advance(DAY + ttl)
    assert await job.run() == 2  # all but the room's head
    assert await chat.history(room, after=0, limit=10) == []
    message, created = await chat.persist(room, sender=users[0], text="later", client_msg_id="later")
    assert created
    assert message.seq == 9
    message, created = await chat.persist(other, sender=users[0], text="again", client_msg_id="again")
    assert created
    assert message.seq == 2
    assert await job.run() == 2  # the old heads (room's 8, other's 1) are not heads any more
    async with container.db.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(messages))).scalar_one() == 2
