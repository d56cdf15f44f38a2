"""Chat sends arriving together are published to the stream in one call, in arrival order, with one
persister wake-up (ADR 0056); a failed publish fails every send it carried, and the next burst is
published again."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from mercato.gateway.realtime import SendCoalescer
from mercato.kit.messaging import Message


def _message(n: int) -> Message:
    return Message(
        id=uuid.UUID(int=n),
        source="t",
        type="t",
        subject="s",
        time=datetime.now(UTC),
        data={"n": n},
        topic="mercato.chat",
        key="room",
    )


async def test_a_burst_is_one_publish_in_arrival_order() -> None:
    batches: list[list[str]] = []
    announced: list[int] = []

    async def publish(messages: list[Message]) -> None:
        await asyncio.sleep(0.01)
        batches.append([f"m{m.data['n']}" for m in messages])

    async def announce() -> None:
        announced.append(len(batches))

    sends = SendCoalescer(publish, announce)
    await asyncio.gather(*(sends.publish(_message(n)) for n in range(5)))
    assert batches == [[f"m{n}" for n in range(5)]]
    assert announced == [1]
    # Sends arriving while a publish is in flight ride the next one.
    first = asyncio.create_task(sends.publish(_message(5)))
    await asyncio.sleep(0)
    later = [asyncio.create_task(sends.publish(_message(n))) for n in (6, 7)]
    await asyncio.gather(first, *later)
    assert batches[1:] == [["m5"], ["m6", "m7"]]


async def test_a_failed_publish_fails_its_sends_and_the_next_burst_goes_out() -> None:
    fail = True
    batches: list[int] = []

    async def publish(messages: list[Message]) -> None:
        if fail:
            raise ConnectionError("database away")
        batches.append(len(messages))

    async def announce() -> None:
        pass

    sends = SendCoalescer(publish, announce)
    results = await asyncio.gather(*(sends.publish(_message(n)) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    fail = False
    await sends.publish(_message(9))
    assert batches == [1]
    with pytest.raises(ValueError, match="positive"):
        SendCoalescer(publish, announce, max_batch=0)


async def test_the_next_burst_does_not_wait_for_the_previous_ones_announcement() -> None:
    """The announcement (a NOTIFY round trip on PostgreSQL) ran before the next burst's publish:
    every burst waited for the previous one's wake-up to reach the database (ADR 0070)."""
    published: list[int] = []
    announcing = asyncio.Event()
    released = asyncio.Event()

    async def publish(messages: list[Message]) -> None:
        published.extend(m.data["n"] for m in messages)

    async def announce() -> None:
        announcing.set()
        await released.wait()  # a NOTIFY that takes its time

    sends = SendCoalescer(publish, announce)
    await sends.publish(_message(1))
    await asyncio.wait_for(announcing.wait(), timeout=1)
    # The first announcement has not finished: the next send is published regardless.
    await asyncio.wait_for(sends.publish(_message(2)), timeout=1)
    assert published == [1, 2]
    released.set()
    await asyncio.sleep(0)
