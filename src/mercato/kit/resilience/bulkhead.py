"""A bulkhead: a concurrency limit per dependency, with a short bounded queue and a fast refusal."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import NoReturn

from mercato.kit.resilience.deadline import current_deadline
from mercato.kit.resilience.errors import BulkheadFull
from mercato.kit.resilience.hooks import BulkheadHooks

__all__ = ["Bulkhead"]


class Bulkhead:
    """At most `max_concurrent` calls in flight, `max_queue` waiting, each waiting <= `queue_timeout_s`.

    A slow dependency then ties up `max_concurrent` of our tasks/connections, not all of them: the rest
    of the service keeps working (guide §1: "thread/connection pool saturation"). Beyond the queue the
    refusal is immediate (`BulkheadFull`), which is what lets the caller shed load with a 503 instead of
    queueing without bound. The queue wait is also bounded by the current deadline. FIFO: a released
    slot passes straight to the oldest waiter, so a newcomer cannot overtake the queue.
    """

    def __init__(
        self,
        name: str = "",
        *,
        max_concurrent: int,
        max_queue: int = 0,
        queue_timeout_s: float = 0.0,
        hooks: Sequence[BulkheadHooks] = (),
    ) -> None:
        if max_concurrent < 1 or max_queue < 0 or queue_timeout_s < 0:
            raise ValueError("max_concurrent must be >= 1, max_queue and queue_timeout_s >= 0")
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._hooks = tuple(hooks)
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejections = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if there is room in it; raise `BulkheadFull` otherwise."""
        if self._in_flight < self.max_concurrent and not self._waiters:
            self._in_flight += 1
            return
        timeout_s = self.queue_timeout_s
        deadline = current_deadline()
        if deadline is not None:
            timeout_s = min(timeout_s, deadline.remaining_s())
        if len(self._waiters) >= self.max_queue or timeout_s <= 0:
            self._reject()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we gave up: pass it on rather than leak it.
                self.release()
            else:
                waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                self._reject()
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if any, else to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_flight -= 1

    async def __aenter__(self) -> Bulkhead:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _reject(self) -> NoReturn:
        self.rejections += 1
        for hook in self._hooks:
            hook.on_bulkhead_rejected(self.name)
        raise BulkheadFull(f"bulkhead for {self.name!r} is full", dependency=self.name)
