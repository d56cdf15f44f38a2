"""A connection's outbound queue, bounded in messages and bytes (guide §33: bounded buffers).

    offer(frame, essential) ->
      fits under the caps                         QUEUED
      else drop the oldest non-essential frames until it fits, then QUEUED
      a non-essential frame that still does not fit: it is dropped itself (DROPPED)
      an essential one: queued above the caps up to `hard_factor` x the caps (OVERFLOW: the caller
        pauses reading that connection and starts its slow-consumer deadline), beyond that REFUSED
        (the caller closes with 1013 "try again later"; the client resumes from its last seq)

So memory per connection is at most `hard_factor * max_bytes` plus one frame, whatever the client does,
and an essential event is never silently lost: it is queued, or the connection is closed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import StrEnum

__all__ = ["Offer", "OutboundQueue"]


# The queue of a connection with nothing queued: one shared empty deque (a deque is ~760 B however
# empty; 10,000 idle connections would hold 7 MiB of them). Never appended to: `_append` swaps in a
# deque of its own first, and `pop` gives it back when the queue drains (ADR 0063).
_EMPTY: deque[tuple[str | bytes, bool, float]] = deque(maxlen=0)


class Offer(StrEnum):
    QUEUED = "queued"
    DROPPED = "dropped"
    OVERFLOW = "overflow"
    REFUSED = "refused"


class OutboundQueue:
    """No `asyncio.Event`s: an idle connection's queue is a deque and a few numbers. The writer and a
    reader paused at the caps each wait on a future made only while they wait (ADR 0056)."""

    __slots__ = (
        "_below_waiter",
        "_bytes",
        "_hard_bytes",
        "_hard_messages",
        "_items",
        "_non_essential",
        "_ready_waiter",
        "dropped",
        "max_bytes",
        "max_messages",
        "over_since",
    )

    def __init__(self, *, max_messages: int, max_bytes: int, hard_factor: float = 2.0) -> None:
        if max_messages < 1 or max_bytes < 1 or hard_factor < 1:
            raise ValueError("caps must be positive and hard_factor at least 1")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._hard_messages = int(max_messages * hard_factor)
        self._hard_bytes = int(max_bytes * hard_factor)
        self._items: deque[tuple[str | bytes, bool, float]] = _EMPTY
        self._bytes = 0
        self._non_essential = 0
        self._ready_waiter: asyncio.Future[None] | None = None
        self._below_waiter: asyncio.Future[None] | None = None
        # Non-essential frames dropped to make room (oldest first) or because there was none.
        self.dropped = 0
        # time.monotonic() when the queue last went over its caps, 0.0 while it is under them: the
        # hub's slow-consumer sweep closes a connection that stays over for `slow_consumer_s`.
        self.over_since = 0.0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def over_cap(self) -> bool:
        return len(self._items) > self.max_messages or self._bytes > self.max_bytes

    def _fits(self, size: int) -> bool:
        return len(self._items) + 1 <= self.max_messages and self._bytes + size <= self.max_bytes

    def offer(self, frame: str | bytes, *, essential: bool, at: float = 0.0) -> Offer:
        """Queue `frame` (its size is its length: JSON text frames are ASCII-escaped or close to it);
        `at` (when the event became durable, 0 if none) comes back from `get`. A frame several
        connections share is one object: the queues hold references, not copies."""
        size = len(frame)
        while not self._fits(size) and self._non_essential:
            self._drop_oldest_non_essential()
        if not self._fits(size):
            if not essential:
                self.dropped += 1
                return Offer.DROPPED
            if len(self._items) + 1 > self._hard_messages or self._bytes + size > self._hard_bytes:
                return Offer.REFUSED
            self._append(frame, essential, at)
            if not self.over_since:
                self.over_since = time.monotonic()
            return Offer.OVERFLOW
        self._append(frame, essential, at)
        return Offer.QUEUED

    def _append(self, frame: str | bytes, essential: bool, at: float) -> None:
        items = self._items
        if items is _EMPTY:
            items = self._items = deque()
        items.append((frame, essential, at))
        self._bytes += len(frame)
        if not essential:
            self._non_essential += 1
        waiter = self._ready_waiter
        if waiter is not None:
            self._ready_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _drop_oldest_non_essential(self) -> None:
        for index, (frame, essential, _at) in enumerate(self._items):
            if not essential:
                del self._items[index]
                self._bytes -= len(frame)
                self._non_essential -= 1
                self.dropped += 1
                return

    async def get(self) -> tuple[str | bytes, float]:
        """The oldest frame and its `at`, waiting for one."""
        while not self._items:
            waiter = self._ready_waiter
            if waiter is None or waiter.done():
                waiter = self._ready_waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self.pop()

    def pop(self) -> tuple[str | bytes, float]:
        """The oldest frame and its `at`, now (IndexError when the queue is empty)."""
        items = self._items
        frame, essential, at = items.popleft()
        if not items:
            self._items = _EMPTY
        self._bytes -= len(frame)
        if not essential:
            self._non_essential -= 1
        if self.over_since and not self.over_cap:
            self.over_since = 0.0
            waiter = self._below_waiter
            if waiter is not None:
                self._below_waiter = None
                if not waiter.done():
                    waiter.set_result(None)
        return frame, at

    async def wait_below_cap(self) -> None:
        """Returns once the queue is back under its caps (at once when it is)."""
        while self.over_cap:
            waiter = self._below_waiter
            if waiter is None or waiter.done():
                waiter = self._below_waiter = asyncio.get_running_loop().create_future()
            await waiter
