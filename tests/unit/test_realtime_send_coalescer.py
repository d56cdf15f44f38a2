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


async def _sends_every(sends: SendCoalescer, count: int, spacing_s: float) -> list[float]:
    """`count` sends `spacing_s` apart; each one's wait for its publish, in seconds."""
    loop = asyncio.get_running_loop()

    async def one(n: int) -> float:
        began = loop.time()
        await sends.publish(_message(n))
        return loop.time() - began

    tasks = []
    for n in range(count):
        tasks.append(asyncio.create_task(one(n)))
        await asyncio.sleep(spacing_s)
    return list(await asyncio.gather(*tasks))


async def test_under_load_a_burst_lingers_for_company_and_no_send_waits_much_past_the_linger() -> None:
    """ADR 0092: at ~1,000 sends/s each publish carried 1.3-1.9 sends; lingering gathers them."""
    batches: list[int] = []

    async def publish(messages: list[Message]) -> None:
        await asyncio.sleep(0.001)
        batches.append(len(messages))

    async def announce() -> None:
        pass

    eager, lingering = SendCoalescer(publish, announce), SendCoalescer(publish, announce, linger_s=0.1)
    await _sends_every(eager, 150, 0.002)
    eager_publishes, batches[:] = len(batches), []
    waits = await _sends_every(lingering, 150, 0.002)
    assert sum(batches) == 150
    # The first window measures the rate (nothing held), then bursts of ~0.1 s of sends each.
    assert len(batches) <= eager_publishes / 3, (batches, eager_publishes)
    assert max(waits) < 0.1 + 0.08, "a send waits the linger, and not much more"


async def test_a_send_at_a_slow_rate_is_not_held_and_a_full_batch_goes_at_once() -> None:
    batches: list[int] = []

    async def publish(messages: list[Message]) -> None:
        batches.append(len(messages))

    async def announce() -> None:
        pass

    slow = SendCoalescer(publish, announce, linger_s=0.5)
    waits = await _sends_every(slow, 8, 0.05)  # 20 sends/s: 10 expected in the linger, ...
    assert max(waits[2:]) >= 0.25, "... so once the rate is seen, they are held"
    slower = SendCoalescer(publish, announce, linger_s=0.05)
    waits = await _sends_every(slower, 8, 0.05)  # 20 sends/s: 1 expected in 50 ms, not 2
    assert max(waits) < 0.025, "nothing would join it: a send goes at once"
    batches[:] = []
    full = SendCoalescer(publish, announce, linger_s=5.0, max_batch=10)
    # A rate of 1,000 sends/s seen in the window that just began (50 expected in the linger).
    full.send_rate, full._window_start = 1000.0, asyncio.get_running_loop().time()
    first = [asyncio.create_task(full.publish(_message(n))) for n in range(5)]
    await asyncio.sleep(0.01)
    assert batches == [], "lingering"
    rest = [asyncio.create_task(full.publish(_message(n))) for n in range(5, 10)]
    await asyncio.wait_for(asyncio.gather(*first, *rest), timeout=2)
    assert batches == [10], "the tenth send filled the batch: it went without the rest of the linger"
    with pytest.raises(ValueError, match="negative"):
        SendCoalescer(publish, announce, linger_s=-1)
