"""What stood between a chat send and its commit (ADR 0065): the persister's pass counted the
consumer lag between its read and its acks (a round trip per pass, and a lag that counted the batch in
hand), and a send woke every loop waiting on the shared stream signal (the order feed read two
topics for nothing), besides the per-message acks (tested with each stream's contract)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from mercato.bootstrap import Container
from mercato.gateway.realtime import CHAT_SENDS, RealtimeRuntime
from mercato.kit.messaging import STREAM_CHANNEL, LagReporter, Message, SqlLogStream, Stream
from mercato.kit.realtime import ChannelEvent
from mercato.shop.chat.service import ChatPersister, send_message


class _Recording:
    """The container's stream, recording the order of the calls a persister pass makes."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._stream, name)
        if name in {"read", "ack", "ack_many", "nack", "lag"}:

            async def recorded(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return await attribute(*args, **kwargs)

            return recorded
        return attribute


async def test_the_lag_is_counted_after_the_pass_and_at_most_once_a_second(container: Container) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("lag", users, created_by=users[0])).id
    stream = _Recording(container.stream)
    published: list[ChannelEvent] = []

    async def publish_many(events: list[ChannelEvent]) -> None:
        published.extend(events)

    at = [0.0]  # the lag reporter's clock: the three passes fall within its busy interval
    lag = LagReporter(stream, container.messaging_hook, busy_interval_s=1.0, now=lambda: at[0])  # type: ignore[arg-type]
    persister = ChatPersister(chat, stream, publish_many, consumer="t1", lag=lag)  # type: ignore[arg-type]
    now = container.clock.now()
    for n in range(3):
        await container.stream.publish(
            [
                send_message(
                    room_id=room, sender=users[0], text=f"m{n}", client_msg_id=f"c{n}", reply_to="", now=now
                )
            ]
        )
        assert await persister.run_once() == 1
        at[0] += 0.3
    # The first pass: read, acks, then the count (after the acks: the batch in hand is not lag). The
    # next two passes, within the second: no count at all.
    assert stream.calls == ["read", "ack_many", "lag", "read", "ack_many", "read", "ack_many"]
    assert [e.seq for e in published] == [1, 2, 3]


async def test_a_lag_reporter_counts_busy_passes_at_most_once_per_busy_interval() -> None:
    counted: list[int] = []

    class _Stream:
        async def lag(self, topic: str, group: str) -> int:
            counted.append(1)
            return 0

    class _Hook:
        def consumer_lag(self, *, group: str, topic: str, messages: int) -> None:
            pass

    now = [100.0]
    reporter = LagReporter(
        _Stream(),  # type: ignore[arg-type]
        _Hook(),  # type: ignore[arg-type]
        interval_s=5.0,
        busy_interval_s=1.0,
        now=lambda: now[0],
    )
    for _ in range(10):  # ten busy passes within 0.9 s: one count (was: ten)
        await reporter.report("t", "g", busy=True)
        now[0] += 0.09
    assert len(counted) == 1
    now[0] += 0.2
    await reporter.report("t", "g", busy=True)
    assert len(counted) == 2
    await reporter.report("t", "g", busy=False)  # idle: not before interval_s
    assert len(counted) == 2
    now[0] += 5.0
    await reporter.report("t", "g", busy=False)
    assert len(counted) == 3


async def test_a_chat_send_wakes_the_chat_persisters_not_every_stream_consumer(container: Container) -> None:
    runtime = RealtimeRuntime(container)
    signals = container.db.signals
    stream_before = signals.mark((STREAM_CHANNEL,))
    chat_before = signals.mark((CHAT_SENDS,))
    await runtime._announce()
    assert signals.mark((STREAM_CHANNEL,)) == stream_before  # the order feed sleeps on
    assert signals.mark((CHAT_SENDS,)) != chat_before


async def test_on_the_sql_log_a_chat_publish_fires_the_chat_signal_not_the_shared_one(
    container: Container,
) -> None:
    """The SQL log fired the shared stream signal on every publish, chat sends included: each woke the
    order feed. The container's SQL log fires `CHAT_SENDS` for the chat topic, `stream` for the rest."""
    if not isinstance(container.stream, SqlLogStream):
        pytest.skip("the SQL log's own signal")
    signals = container.db.signals
    stream_before, chat_before = signals.mark((STREAM_CHANNEL,)), signals.mark((CHAT_SENDS,))
    room = uuid.uuid4()
    now = container.clock.now()
    await container.stream.publish(
        [send_message(room_id=room, sender="u", text="hi", client_msg_id="c1", reply_to="", now=now)]
    )
    assert signals.mark((STREAM_CHANNEL,)) == stream_before  # the order feed sleeps on
    assert signals.mark((CHAT_SENDS,)) != chat_before
    order_event = Message(
        id=uuid.uuid4(),
        source="t",
        type="t.order",
        subject="o",
        time=now,
        data={},
        topic="mercato.orders",
        key="o",
    )
    await container.stream.publish([order_event])
    assert signals.mark((STREAM_CHANNEL,)) != stream_before


async def test_a_send_notifies_other_processes_only_where_their_persisters_need_it(
    container: Container,
) -> None:
    """ADR 0077: with sequential passes on the SQL log or Redis Streams, a send wakes this process's
    persister only (it reads every partition; one another process's pass holds is read again by
    that loop after its pass): no `pg_notify` round trip per send. JetStream's single reader and
    the overlapped passes (which sleep after a pass until a signal) still get the NOTIFY."""
    signals = container.db.signals
    if not signals.cross_process:
        pytest.skip("NOTIFY is PostgreSQL's")
    notified: list[str] = []
    notify_now = signals._notify_now

    async def recording(channel: str) -> None:
        notified.append(channel)
        await notify_now(channel)

    signals._notify_now = recording  # type: ignore[method-assign]
    try:
        runtime = RealtimeRuntime(container)
        before = signals.mark((CHAT_SENDS,))
        await runtime._announce()
        assert signals.mark((CHAT_SENDS,)) != before  # this process's persister is woken either way
        nats = container.settings.messaging.backend == "nats"
        assert bool(notified) == nats
        realtime = container.settings.realtime.model_copy(update={"overlap_persister_passes": True})
        container.settings = container.settings.model_copy(update={"realtime": realtime})
        await RealtimeRuntime(container)._announce()
        assert notified, "overlapped passes sleep until a signal: other processes must hear the send"
    finally:
        signals._notify_now = notify_now  # type: ignore[method-assign]


async def test_the_empty_read_after_a_busy_pass_counts_the_lag_at_the_busy_rate(container: Container) -> None:
    """ADR 0077: messages one per pass, each pass followed by the loop's empty read. That read
    counted as an idle pass that "settled" the gauge at once: a lag count per message. Now it
    counts at the busy rate (at most once per busy interval); a later idle pass settles it."""
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("lag after busy", users, created_by=users[0])).id
    stream = _Recording(container.stream)

    async def publish_many(events: list[ChannelEvent]) -> None:
        pass

    at = [0.0]
    lag = LagReporter(
        stream, container.messaging_hook, busy_interval_s=1.0, interval_s=5.0, now=lambda: at[0]
    )  # type: ignore[arg-type]
    persister = ChatPersister(chat, stream, publish_many, consumer="t1", lag=lag)  # type: ignore[arg-type]
    now = container.clock.now()
    for n in range(3):
        message = send_message(
            room_id=room, sender=users[0], text=f"m{n}", client_msg_id=f"c{n}", reply_to="", now=now
        )
        await container.stream.publish([message])
        assert await persister.run_once() == 1
        assert await persister.run_once() == 0  # the loop's read after a busy pass
        at[0] += 0.2
    assert stream.calls.count("lag") == 1, stream.calls
    at[0] += 0.5  # past the busy interval, no traffic: the next idle pass settles the gauge
    assert await persister.run_once() == 0
    assert stream.calls.count("lag") == 2, stream.calls
