"""Wake on work (kit/storage/signals.py): background loops are woken by committed work, in this
process and in others, and an idle worker stays quiet between its slow safety polls."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from mercato.bootstrap import Container, build_container
from mercato.config import MessagingSettings, WorkerSettings
from mercato.kit.clock import ManualClock
from mercato.kit.messaging import OUTBOX_CHANNEL, STREAM_CHANNEL, Message, Outbox, OutboxRelay, SqlLogStream
from mercato.kit.realtime import ChannelEvent, SqlBroker
from mercato.kit.storage import Database, create_database
from mercato.kit.storage.statements import add_driver_listener
from mercato.workers import PeriodicJob, run_jobs, shop_jobs
from mercato.workers.sagas import build_saga_runner
from tests.conftest import make_settings
from tests.integration.statement_budget import counting
from tests.integration.test_stream_contract import make_message

SAFETY_S = 30.0  # far longer than any wait below: only a signal can end it


def message(n: int) -> Message:
    return make_message(f"k{n}", n)


async def test_a_committed_outbox_write_wakes_the_relay_job_and_a_rollback_does_not(
    container: Container, clock: ManualClock
) -> None:
    passes: list[float] = []
    woke = asyncio.Event()
    first = asyncio.Event()

    async def relay_pass() -> int:
        passes.append(time.monotonic())
        first.set()
        woke.set()
        return 0

    stop = asyncio.Event()
    job = PeriodicJob("relay", SAFETY_S, relay_pass, wake_on=(OUTBOX_CHANNEL,))
    runner = asyncio.create_task(run_jobs([job], stop, signals=container.db.signals))
    try:
        await asyncio.wait_for(first.wait(), timeout=5.0)
        # On PostgreSQL the listener, once it holds its LISTEN, fires once (for what it missed).
        await asyncio.sleep(0.5)
        before = len(passes)
        woke.clear()
        outbox = Outbox(clock=clock, signals=container.db.signals)
        try:
            async with container.db.write() as conn:
                await outbox.add(conn, message(0))
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        await asyncio.sleep(0.2)
        assert len(passes) == before, "a rolled-back write must not wake the relay"
        started = time.monotonic()
        async with container.db.write() as conn:
            await outbox.add(conn, message(1))
        await asyncio.wait_for(woke.wait(), timeout=2.0)
        assert passes[before] - started < 0.5
    finally:
        stop.set()
        await runner


async def test_another_process_commit_wakes_a_waiter(database_url: str, clock: ManualClock) -> None:
    """Two databases objects on one database stand for two processes: NOTIFY/LISTEN on PostgreSQL,
    the write-ahead log watcher on SQLite."""
    writer = create_database(database_url)
    reader = create_database(database_url)
    try:
        signals = reader.signals
        mark = signals.mark((OUTBOX_CHANNEL,))
        # The first wait starts the listener (which fires once when it begins): let it settle.
        await signals.wait((OUTBOX_CHANNEL,), since=mark, timeout_s=1.0)
        await asyncio.sleep(0.3)
        mark = signals.mark((OUTBOX_CHANNEL,))
        waiting = asyncio.create_task(signals.wait((OUTBOX_CHANNEL,), since=mark, timeout_s=SAFETY_S))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "nothing was written yet"
        started = time.monotonic()
        async with writer.write() as conn:
            await Outbox(clock=clock, signals=writer.signals).add(conn, message(2))
        assert await asyncio.wait_for(waiting, timeout=3.0) is True
        assert time.monotonic() - started < 1.5
    finally:
        async with writer.write() as conn:
            await conn.execute(text("DELETE FROM messaging_outbox"))
        await reader.dispose()
        await writer.dispose()


async def test_an_idle_worker_sends_almost_nothing_to_the_database(database_url: str) -> None:
    """Every job and the saga runner for 3 s on an idle shop: before wake-on-work, the relay, the
    consumers and the projectors polled every 0.2 s (over a hundred statements in 3 s). The safety
    polls are set long here, so what is left is the timers that are not woken by work."""
    settings = make_settings(
        database_url,
        messaging=MessagingSettings(relay_interval_s=60),
        worker=WorkerSettings(notify_interval_s=60),
    )
    container = build_container(settings)
    stop = asyncio.Event()
    try:
        jobs = shop_jobs(container)
        runner = build_saga_runner(container)
        tasks = [
            asyncio.create_task(run_jobs(jobs, stop, signals=container.db.signals)),
            asyncio.create_task(runner.run(stop)),
        ]
        await asyncio.sleep(3.0)  # every job's first pass, the listener's start (a loaded machine)
        with counting(container) as idle:
            await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await container.close()
    # What remains: the breaker report's heartbeat (3 statements, every ~4 s) and the 5 s
    # reservation sweep (1).
    assert len(idle.statements) <= 8, idle.report()


async def test_the_sql_realtime_broker_is_woken_by_a_publish_not_its_poll(database_url: str) -> None:
    """Two brokers on one database stand for two API processes; each polls only every 30 s."""
    first, second = create_database(database_url), create_database(database_url)
    brokers = [SqlBroker(first, poll_interval_s=SAFETY_S), SqlBroker(second, poll_interval_s=SAFETY_S)]
    try:
        subscriptions = [await broker.subscribe() for broker in brokers]
        await asyncio.sleep(0.5)  # each reader's first look, and on PostgreSQL its LISTEN
        started = time.monotonic()
        await brokers[0].publish(ChannelEvent(channel="room:signals", type="message", data={"n": 1}, seq=1))
        for subscription in subscriptions:  # this process's reader, and the other's
            received = await asyncio.wait_for(subscription.get(), timeout=3.0)
            assert received is not None
            assert received.data == {"n": 1}
        assert time.monotonic() - started < 2.0
    finally:
        for broker in brokers:
            await broker.aclose()
        async with first.write() as conn:
            await conn.execute(text("DELETE FROM realtime_broker_log"))
        await first.dispose()
        await second.dispose()


async def test_an_announcement_reaches_another_process_and_bursts_coalesce(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("announcements cross processes by NOTIFY (PostgreSQL); SQLite's is the file watcher")
    announcer, listener = create_database(database_url), create_database(database_url)
    try:
        signals = listener.signals
        mark = signals.mark((STREAM_CHANNEL,))
        await signals.wait((STREAM_CHANNEL,), since=mark, timeout_s=1.0)  # starts the LISTEN
        await asyncio.sleep(0.3)
        mark = signals.mark((STREAM_CHANNEL,))
        waiting = asyncio.create_task(signals.wait((STREAM_CHANNEL,), since=mark, timeout_s=SAFETY_S))
        # A burst: one NOTIFY in flight, the rest folded into one more after it.
        await asyncio.gather(*(announcer.signals.announce(STREAM_CHANNEL) for _ in range(20)))
        assert await asyncio.wait_for(waiting, timeout=3.0) is True
    finally:
        await listener.dispose()
        await announcer.dispose()


async def listening(databases: tuple[Database, ...], channel: str) -> None:
    """Each of `databases` LISTENs on `channel` (a first wait starts it), and the LISTENs are in."""
    for db in databases:
        mark = db.signals.mark((channel,))
        await db.signals.wait((channel,), since=mark, timeout_s=1.0)
    await asyncio.sleep(0.3)


async def test_an_own_announcement_wakes_this_process_once_not_again_by_its_notify(
    database_url: str,
) -> None:
    """`announce` fires locally and NOTIFYs; this process's listener hears that NOTIFY too. Fired
    again, every loop waiting on the channel ran a second, empty pass per announcement (the chat
    persister: one wasted stream read per message sent, ADR 0065). Another database (another
    process) still hears it."""
    if not database_url.startswith("postgresql"):
        pytest.skip("announcements cross processes by NOTIFY (PostgreSQL)")
    announcer, other = create_database(database_url), create_database(database_url)
    try:
        await listening((announcer, other), STREAM_CHANNEL)
        own_before = announcer.signals.mark((STREAM_CHANNEL,))
        other_before = other.signals.mark((STREAM_CHANNEL,))
        await announcer.signals.announce(STREAM_CHANNEL)
        await asyncio.sleep(0.5)  # the NOTIFY's round trip back to both listeners
        assert announcer.signals.mark((STREAM_CHANNEL,))[0] - own_before[0] == 1
        assert other.signals.mark((STREAM_CHANNEL,))[0] - other_before[0] == 1
    finally:
        await other.dispose()
        await announcer.dispose()


async def test_a_woken_job_with_a_batch_window_serves_a_burst_of_signals_in_few_passes(
    container: Container,
) -> None:
    """ADR 0055: each pass of a side job costs its fixed statements whatever it finds, so under load
    one pass per signalled commit was most of the worker's CPU. With a window, a burst of signals
    costs about one pass per window; a signal after a quiet spell still wakes the job at once."""
    signals = container.db.signals
    passes: list[float] = []
    window_s = 0.25
    passed = asyncio.Event()

    async def side_pass() -> int:
        passes.append(time.monotonic())
        passed.set()
        return 0

    stop = asyncio.Event()
    job = PeriodicJob("side", SAFETY_S, side_pass, wake_on=(STREAM_CHANNEL,), batch_window_s=window_s)
    runner = asyncio.create_task(run_jobs([job], stop, signals=signals))
    try:
        await asyncio.wait_for(passed.wait(), timeout=5.0)
        await asyncio.sleep(0.6)  # the first pass, and PostgreSQL's catch-up pass, are behind us
        quiet = len(passes)
        passed.clear()
        fired = time.monotonic()
        signals.fire(STREAM_CHANNEL)
        await asyncio.wait_for(passed.wait(), timeout=2.0)
        assert passes[quiet] - fired < 0.2, "after a quiet spell the first signal wakes the job at once"
        burst_start = time.monotonic()
        while time.monotonic() - burst_start < 1.0:  # a commit every 10 ms for a second
            signals.fire(STREAM_CHANNEL)
            await asyncio.sleep(0.01)
        await asyncio.sleep(window_s + 0.1)
        burst = [t for t in passes if t >= burst_start]
        # ~100 signals: about one pass per window (≤ 1 s / 0.25 s + the one after), never per signal.
        assert 2 <= len(burst) <= 6, burst
        assert all(b - a >= window_s * 0.9 for a, b in zip(passes[quiet:], passes[quiet + 1 :], strict=False))
    finally:
        stop.set()
        await runner


async def test_a_relay_pass_on_the_sql_log_announces_by_a_notify_in_its_transaction(
    database_url: str, clock: ManualClock
) -> None:
    """ADR 0083: the relay of the SQL log announces the stream with a NOTIFY riding in its claim
    (no statement of its own after the pass): another process is woken once, this one once (by the
    log's commit, not again by its own NOTIFY)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("announcements cross processes by NOTIFY (PostgreSQL)")
    relaying, other = create_database(database_url), create_database(database_url)
    try:
        await listening((relaying, other), STREAM_CHANNEL)
        async with relaying.write() as conn:
            await Outbox(clock=clock).add(conn, message(1))
        relay = OutboxRelay(
            relaying, SqlLogStream(relaying, clock=clock), clock=clock, announces=STREAM_CHANNEL
        )
        own_before = relaying.signals.mark((STREAM_CHANNEL,))
        other_before = other.signals.mark((STREAM_CHANNEL,))
        notifies: list[str] = []
        remove = add_driver_listener(lambda sql: notifies.append(sql) if sql and "pg_notify" in sql else None)
        try:
            assert await relay.relay_once() == 1
        finally:
            remove()
        await asyncio.sleep(0.5)  # the NOTIFY's round trip back to both listeners
        [claim] = notifies  # the NOTIFY rides in the claim: no statement of its own
        assert claim.startswith("WITH candidates"), claim
        assert relaying.signals.mark((STREAM_CHANNEL,))[0] - own_before[0] == 1
        assert other.signals.mark((STREAM_CHANNEL,))[0] - other_before[0] == 1
    finally:
        async with relaying.write() as conn:
            await conn.execute(text("DELETE FROM messaging_outbox"))
            await conn.execute(text("DELETE FROM messaging_stream_log"))
            await conn.execute(text("DELETE FROM messaging_stream_heads"))
        await other.dispose()
        await relaying.dispose()


async def test_an_outbox_write_notifies_other_processes_only_where_no_relay_waits(
    database_url: str, clock: ManualClock
) -> None:
    """ADR 0083: a process whose relay waits on the outbox signal (the worker, for its saga moves)
    wakes it locally at commit and sends no NOTIFY; a process without one (the API) still does."""
    if not database_url.startswith("postgresql"):
        pytest.skip("outbox writes cross processes by NOTIFY (PostgreSQL)")
    worker, other, api = (create_database(database_url) for _ in range(3))
    try:
        await listening((worker, other), OUTBOX_CHANNEL)
        assert worker.signals.waited_on(OUTBOX_CHANNEL)
        assert not api.signals.waited_on(OUTBOX_CHANNEL)
        own_before = worker.signals.mark((OUTBOX_CHANNEL,))
        other_before = other.signals.mark((OUTBOX_CHANNEL,))
        async with worker.write() as conn:
            await Outbox(clock=clock, signals=worker.signals).add(conn, message(1))
        await asyncio.sleep(0.5)
        assert worker.signals.mark((OUTBOX_CHANNEL,))[0] - own_before[0] == 1  # at commit, here
        assert other.signals.mark((OUTBOX_CHANNEL,)) == other_before  # no NOTIFY
        async with api.write() as conn:
            await Outbox(clock=clock, signals=api.signals).add(conn, message(2))
        await asyncio.sleep(0.5)
        assert other.signals.mark((OUTBOX_CHANNEL,))[0] - other_before[0] == 1
        assert worker.signals.mark((OUTBOX_CHANNEL,))[0] - own_before[0] == 2
    finally:
        async with worker.write() as conn:
            await conn.execute(text("DELETE FROM messaging_outbox"))
        for db in (api, other, worker):
            await db.dispose()
