"""`stop_if_cancelled`: a loop that retries failed calls stops when a cancellation hid in a failure."""

from __future__ import annotations

import asyncio

import pytest

from mercato.kit.storage.cancellation import stop_if_cancelled


async def _retry_loop(attempts: list[int], *, look: bool) -> None:
    # A call whose failure replaces the cancellation that landed in it (as a refused rollback did).
    while True:
        attempts.append(1)
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            try:
                raise RuntimeError("rollback refused: the connection was invalidated")
            except RuntimeError:
                pass  # the loop's "failed call, retry" branch
        if look:
            stop_if_cancelled()
        if len(attempts) > 50:
            return


async def test_a_loop_that_looks_stops_at_its_cancellation() -> None:
    attempts: list[int] = []
    task = asyncio.create_task(_retry_loop(attempts, look=True))
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert len(attempts) < 10


async def test_without_looking_the_cancelled_loop_runs_on() -> None:
    attempts: list[int] = []
    task = asyncio.create_task(_retry_loop(attempts, look=False))
    await asyncio.sleep(0.03)
    task.cancel()
    await asyncio.wait_for(task, timeout=5)  # it ran to its own end: the cancellation was lost
    assert len(attempts) > 50
