"""Concept 32: CPU-heavy work runs off the event loop, so no turn of the loop takes over 20 ms.

Every callback the loop runs (each step of each task) is timed in the loop thread's own CPU time
(`time.thread_time`): what that callback kept the loop busy with, whatever the operating system's
scheduler did meanwhile (wall time on a loaded 2-core machine would measure the machine). Production-
cost argon2id hashes and verifications through `PasswordHashing` (worker threads) must keep every
callback under the bound; the same verification made inline by a coroutine must be caught, or the
probe would prove nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from mercato.config import AuthSettings
from mercato.shop.identity.passwords import PasswordHashing

BLOCKED_S = 0.020
PASSWORD = "correct horse battery staple"


def _production_hashing() -> PasswordHashing:
    defaults = AuthSettings()
    return PasswordHashing(
        time_cost=defaults.argon2_time_cost,
        memory_kib=defaults.argon2_memory_kib,
        parallelism=defaults.argon2_parallelism,
    )


@contextmanager
def _longest_callback(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Yields a one-item list holding the most loop-thread CPU seconds any callback took."""
    longest = [0.0]
    original = asyncio.events.Handle._run

    def timed(handle: Any) -> None:
        started = time.thread_time()
        try:
            original(handle)
        finally:
            longest[0] = max(longest[0], time.thread_time() - started)

    with monkeypatch.context() as patch:
        patch.setattr(asyncio.events.Handle, "_run", timed)
        yield longest


async def _run(work: Coroutine[Any, Any, None]) -> None:
    await asyncio.create_task(work)


async def test_password_hashing_never_blocks_the_loop_for_more_than_20_ms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hashing = _production_hashing()
    stored = await hashing.hash(PASSWORD)

    async def inline() -> None:
        hashing._hasher.verify(stored, PASSWORD)  # what a careless handler would do

    with _longest_callback(monkeypatch) as longest:
        await _run(inline())
    assert longest[0] > BLOCKED_S, f"the probe missed an inline argon2 verification ({longest[0]:.3f} s)"

    async def logins() -> None:
        results = await asyncio.gather(
            *(hashing.verify(stored, PASSWORD) for _ in range(4)),
            hashing.verify(stored, "a wrong password"),
        )
        assert results == [True, True, True, True, False]
        await hashing.hash("another password entirely")

    with _longest_callback(monkeypatch) as longest:
        await _run(logins())
    assert longest[0] < BLOCKED_S, f"a loop callback ran {longest[0] * 1000:.1f} ms of CPU"
