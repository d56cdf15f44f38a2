"""The SIGTERM drain hook: readiness fails at once, the server's own handler runs `drain_s` later,
a second signal hands on at once."""

from __future__ import annotations

import asyncio
import os
import signal
from types import FrameType

import pytest

from mercato.kit.health import Drain, HealthRegistry


def test_first_sigterm_drains_then_hands_on() -> None:
    calls: list[tuple[int, float]] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def server_handler(sig: int, _frame: FrameType | None) -> None:
            calls.append((sig, loop.time()))

        original = signal.signal(signal.SIGTERM, server_handler)
        drain = Drain(drain_s=0.3)
        health = HealthRegistry(drain=drain)
        try:
            assert drain.install(loop)
            started = loop.time()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)
            assert health.draining
            assert not calls
            await asyncio.sleep(0.4)
            assert len(calls) == 1
            assert calls[0][1] - started >= 0.3
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal: straight through
            await asyncio.sleep(0.05)
            assert len(calls) == 2
        finally:
            drain.uninstall()
            assert signal.getsignal(signal.SIGTERM) is server_handler
            signal.signal(signal.SIGTERM, original)

    asyncio.run(run())


def test_nothing_installed_without_a_drain_or_a_handler() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        assert not Drain(drain_s=0).install(loop)
        original = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            assert not Drain(drain_s=1).install(loop)  # the default action: no server of ours
        finally:
            signal.signal(signal.SIGTERM, original)

    asyncio.run(run())
    with pytest.raises(ValueError):
        Drain(drain_s=-1)
