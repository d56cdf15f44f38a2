"""A priority-aware concurrency limiter: a fixed in-flight limit, per-class ceilings, short bounded queues.

Admission rule for a request of class ``c`` (``limit`` = ``max_inflight``)::

    ceiling(c) = max(1, floor(limit * share(c)))      share(CRITICAL) = 1.0 > share(NORMAL) > share(SHEDDABLE)
    admit now          if inflight < ceiling(c) and no request of class c or higher is queued
    queue (bounded)    elif len(queue(c)) < queue_size(c), for at most queue_timeout_s(c)
    refuse at once     otherwise (`Overloaded`)

The slots between ``ceiling(SHEDDABLE)`` and ``limit`` are headroom only higher classes may use, so as
load grows the sheddable class is refused first, then normal, and critical work still finds a slot.
A freed slot goes to the oldest waiter of the highest class whose ceiling allows it. Queues are short
and their timeouts tiny on purpose: a request that waits longer than the work takes is better refused
(the client retries elsewhere or later) than left to age in a buffer (guide §33: bounded queues).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from enum import IntEnum

from mercato.kit.backpressure.metrics import BackpressureHook, NoBackpressureMetrics
from mercato.kit.clock import Clock, SystemClock

__all__ = ["ClassLimits", "ConcurrencyLimiter", "Overloaded", "Priority"]


class Priority(IntEnum):
    """Lower value = more important = shed later."""

    CRITICAL = 0
    NORMAL = 1
    SHEDDABLE = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class ClassLimits:
    """How much of the limit one class may use and how long it may wait for a slot."""

    share: float
    queue_size: int
    queue_timeout_s: float

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError("share must be in (0, 1]")
        if self.queue_size < 0 or self.queue_timeout_s < 0:
            raise ValueError("queue_size and queue_timeout_s must not be negative")


DEFAULT_CLASSES: Mapping[Priority, ClassLimits] = {
    # Checkout and probes may wait a little: refusing a paying customer costs more than 100 ms.
    Priority.CRITICAL: ClassLimits(share=1.0, queue_size=32, queue_timeout_s=0.1),
    Priority.NORMAL: ClassLimits(share=0.85, queue_size=16, queue_timeout_s=0.004),
    Priority.SHEDDABLE: ClassLimits(share=0.6, queue_size=16, queue_timeout_s=0.004),
}


class Overloaded(Exception):
    """The request was refused: no slot for its class now, and none came within its queue timeout."""

    def __init__(self, priority: Priority, *, reason: str, retry_after_s: int) -> None:
        super().__init__(f"{priority.label} request shed ({reason})")
        self.priority = priority
        self.reason = reason  # "queue_full" | "queue_timeout"
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    enqueued_s: float
    timer: asyncio.TimerHandle | None = None


_PRIORITIES = tuple(sorted(Priority))
_LOWEST = _PRIORITIES[-1]


class ConcurrencyLimiter:
    """Not thread-safe: one per process and event loop (a per-process limit, as uvicorn runs workers)."""

    def __init__(
        self,
        *,
        max_inflight: int,
        classes: Mapping[Priority, ClassLimits] = DEFAULT_CLASSES,
        retry_after_s: int = 1,
        clock: Clock | None = None,
        hook: BackpressureHook | None = None,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        missing = set(Priority) - set(classes)
        if missing:
            raise ValueError(f"limits missing for {sorted(p.label for p in missing)}")
        shares = [classes[p].share for p in Priority]
        if shares != sorted(shares, reverse=True):
            raise ValueError("a lower class may not have a larger share than a higher one")
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self._classes = dict(classes)
        self._ceilings = {p: max(1, math.floor(max_inflight * classes[p].share)) for p in Priority}
        self._queues: dict[Priority, deque[_Waiter]] = {p: deque() for p in Priority}
        # Per class, the queues that go before it (its own and every higher class's), most important
        # first: checked on every admission, so resolved once rather than walking the enum each time.
        self._ahead: dict[Priority, tuple[deque[_Waiter], ...]] = {
            p: tuple(self._queues[q] for q in _PRIORITIES if q <= p) for p in _PRIORITIES
        }
        self._inflight = 0
        self._clock = clock or SystemClock()
        self._hook: BackpressureHook = hook or NoBackpressureMetrics()

    @property
    def inflight(self) -> int:
        return self._inflight

    def adopt_limits(self, other: ConcurrencyLimiter) -> None:
        """Take `other`'s limits (built and checked by its constructor) while keeping this limiter's
        in-flight count and queues: a runtime-configuration change (ADR 0045). A raised limit admits
        queued waiters at once; a lowered one lets in-flight work finish and admits nothing new."""
        self.max_inflight = other.max_inflight
        self.retry_after_s = other.retry_after_s
        self._classes = dict(other._classes)
        self._ceilings = dict(other._ceilings)
        self._grant_waiters()

    def ceiling(self, priority: Priority) -> int:
        return self._ceilings[priority]

    def queued(self, priority: Priority) -> int:
        return len(self._queues[priority])

    def try_acquire(self, priority: Priority) -> bool:
        """Take a slot if one is free for this class right now; never waits."""
        if self._inflight >= self._ceilings[priority]:
            return False
        # Queued waiters of this class or a higher one were first: do not overtake them.
        if any(self._ahead[priority]):
            return False
        self._take(priority, queue_wait_s=0.0)
        return True

    async def acquire(self, priority: Priority) -> None:
        """Take a slot, waiting at most the class's queue timeout; raise `Overloaded` otherwise."""
        if self.try_acquire(priority):
            return
        limits = self._classes[priority]
        queue = self._queues[priority]
        if len(queue) >= limits.queue_size or limits.queue_timeout_s <= 0:
            self._refuse(priority, "queue_full")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(future=loop.create_future(), enqueued_s=self._clock.monotonic())
        waiter.timer = loop.call_later(limits.queue_timeout_s, self._expire, priority, waiter)
        queue.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            # The caller went away while queued, or just after a slot was handed to it.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release()
            else:
                self._forget(priority, waiter)
            raise

    def release(self) -> None:
        """Give a slot back and hand it to the most important waiter that may use it."""
        if self._inflight <= 0:
            raise RuntimeError("release() without a matching acquire")
        self._inflight -= 1
        self._hook.inflight_changed(self._inflight)
        self._grant_waiters()

    @asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    # -- internals --------------------------------------------------------------------------------

    def _take(self, priority: Priority, *, queue_wait_s: float) -> None:
        self._inflight += 1
        self._hook.inflight_changed(self._inflight)
        self._hook.admitted(priority, queue_wait_s=queue_wait_s)

    def _refuse(self, priority: Priority, reason: str) -> None:
        self._hook.shed(priority, reason=reason)
        raise Overloaded(priority, reason=reason, retry_after_s=self.retry_after_s)

    def _grant_waiters(self) -> None:
        if not any(self._ahead[_LOWEST]):
            return  # nobody is queued (the common case: called on every release)
        for priority in _PRIORITIES:
            queue = self._queues[priority]
            while queue and self._inflight < self._ceilings[priority]:
                waiter = queue.popleft()
                if waiter.future.done():  # cancelled by its caller; already accounted for
                    continue
                if waiter.timer is not None:
                    waiter.timer.cancel()
                self._take(priority, queue_wait_s=self._clock.monotonic() - waiter.enqueued_s)
                waiter.future.set_result(None)
            if queue:
                # A higher class still waits: lower classes must not take the slots it is owed.
                return

    def _expire(self, priority: Priority, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._forget(priority, waiter)
        self._hook.shed(priority, reason="queue_timeout")
        waiter.future.set_exception(
            Overloaded(priority, reason="queue_timeout", retry_after_s=self.retry_after_s)
        )

    def _forget(self, priority: Priority, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        with suppress(ValueError):  # already popped by _grant_waiters
            self._queues[priority].remove(waiter)
        # A departing head-of-line waiter may unblock lower classes.
        if self._inflight < self.max_inflight:
            self._grant_waiters()
