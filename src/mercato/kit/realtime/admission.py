"""History reads bounded per process: a subscribe storm is queued, never the whole pool (ADR 0078).

Every `subscribe` with `since` reads history (the channel's head, then the events after `since`), and
1,000 clients subscribing at once held all of the API's pooled database connections: HTTP requests and
the chat persister waited out the pool's timeout (503, "unavailable" error frames) although the
database only was busy. `HistoryGate` lets at most `concurrency` history reads (and subscribe
authorizations) run at once in this process, sized below the pool so the rest of the API always finds
a connection; the others queue in arrival order, each for at most `wait_s`. Past that, a subscribe is
answered `{"type":"error","code":"try_again","retry_after_s":...}` (the client subscribes again with
its `since`, losing nothing), and a gap refill, which a client cannot retry, waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mercato.kit.realtime.events import ChannelEvent, History

__all__ = ["GatedHistory", "HistoryBusy", "HistoryGate"]


class HistoryBusy(Exception):
    """No history read slot within the gate's wait: try again after `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"history reads are busy; try again in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class HistoryGate:
    """At most `concurrency` holders at once; a waiter gives up after `wait_s` (`HistoryBusy`)."""

    def __init__(self, *, concurrency: int, wait_s: float, retry_after_s: float = 1.0) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(concurrency)
        self.waiting = 0  # for metrics and tests: reads queued for a slot now

    @property
    def in_use(self) -> int:
        return self.concurrency - self._slots._value

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise HistoryBusy(self.retry_after_s) from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


class GatedHistory:
    """The `History` port with every read through a `HistoryGate`."""

    def __init__(self, inner: History, gate: HistoryGate) -> None:
        self._inner = inner
        self.gate = gate

    async def head(self, channel: str) -> int:
        async with self.gate.slot():
            return await self._inner.head(channel)

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        async with self.gate.slot():
            return await self._inner.after(channel, seq, limit=limit)
