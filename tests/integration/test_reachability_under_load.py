"""A busy process is not a silent database (ADR 0078).

The reachability probes (kit/storage/reachability.py) must tell "the primary does not answer" from
"our own event loop is too busy to read the answer" and from "the pool is checked out by our own
load". Here the process's event loop is kept busy (CPU-bound work in slices, as 1,000 WebSocket
subscribes are) while the whole pool is checked out over and over, against a PostgreSQL that
answers: the primary must stay reachable throughout. tests/integration/test_partition_fail_fast.py
keeps the other side: a primary that really goes silent is still refused within a second."""

from __future__ import annotations

import asyncio
import contextlib
import time

from sqlalchemy import text

from mercato.kit.storage import create_database


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_busy_loop_and_an_exhausted_pool_are_not_an_unreachable_primary(pg_url: str) -> None:
    # The API's defaults: a pool of 10 + 10, probes every 0.25 s answered within 0.5 s, 2 failures.
    db = create_database(
        pg_url, pool_size=10, max_overflow=10, probe_interval_s=0.25, probe_timeout_s=0.5, probe_failures=2
    )
    assert db.reachability is not None
    verdicts: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def reader() -> None:
        """A subscribe's history read: check out, one statement, check in; again."""
        while not stop.is_set():
            try:
                async with db.read() as conn:
                    await conn.execute(text("SELECT 1"))
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {str(exc)[:80]}")
            await asyncio.sleep(0)

    async def busy() -> None:
        """The rest of the storm's work on the loop (frames, JSON): 5 ms of CPU, then a yield."""
        while not stop.is_set():
            _burn(0.01)
            await asyncio.sleep(0)

    async def watch() -> None:
        """Samples the verdict (the loop is busy: a short verdict can fall between two samples; the
        readers' failures show it too)."""
        while not stop.is_set():
            if db.reachability is not None and db.reachability.unreachable:
                verdicts.append(time.monotonic())
            await asyncio.sleep(0.05)

    try:
        # The pool's 10 connections opened first (starting the probes): a connect under this load
        # takes longer than the pool's connect timeout, which is not what this test is about.
        async with contextlib.AsyncExitStack() as stack:
            for conn in [await stack.enter_async_context(db.read()) for _ in range(10)]:
                await conn.execute(text("SELECT 1"))
        await asyncio.sleep(0.5)
        # 80 busy tasks make a loop round ~0.8 s: each read waits rounds between its steps, so the
        # pool's connections stay checked out for longer than a probe's timeout.
        tasks = [asyncio.create_task(reader()) for _ in range(10)]  # the pool's steady size
        tasks += [asyncio.create_task(busy()) for _ in range(80)]
        tasks.append(asyncio.create_task(watch()))
        # Longer than the probe's session lifetime (5 s): a reconnect happens under the load too.
        await asyncio.sleep(16.0)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert verdicts == [], f"declared unreachable {len(verdicts)} times while it answered"
        assert failures == [], f"reads refused or ended while the primary answered: {failures[:5]}"
    finally:
        stop.set()
        await db.dispose()


async def test_a_long_checkout_corroborates_one_silent_probe_only_while_the_loop_keeps_up(
    pg_url: str,
) -> None:
    """The one-probe shortcut (a connection checked out for longer than a probe's timeout) holds on a
    loop that runs the probe's outcome at once, and not on one that runs it late: there the holder
    waits for the loop, not for the server."""
    db = create_database(pg_url, probe_interval_s=60.0, probe_timeout_s=0.2, probe_failures=2)
    reachability = db.reachability
    assert reachability is not None
    try:
        async with db.read() as conn:
            await conn.execute(text("SELECT 1"))
            await asyncio.sleep(0.3)  # checked out for longer than the probe's timeout
            reachability._outcome(False, time.monotonic() - 0.5)  # ran 0.5 s late: congested
            assert not reachability.unreachable
            reachability._outcome(True, time.monotonic())
            reachability._outcome(False, time.monotonic())  # ran at once: the loop keeps up
            assert reachability.unreachable
        reachability._outcome(True, time.monotonic())
        assert not reachability.unreachable
    finally:
        await db.dispose()
