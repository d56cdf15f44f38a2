"""One client connection's side of fan-out: its subscriptions, seq cursors and outbound queue.

Per subscribed channel the connection keeps `last`, the highest seq it queued. An incoming
sequenced event is queued when it is `last + 1`, ignored when it is `<= last` (a duplicate from a
broker redelivery or a resumed history), and when it is further ahead (the broker lost something, or
the subscription is still replaying history) the connection parks it and refills the gap from the
`History`, in order, before anything newer. That is what makes "exactly once per connection, in seq
order per channel" hold over any broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from mercato.kit.observability import get_logger
from mercato.kit.realtime.admission import HistoryBusy
from mercato.kit.realtime.events import ChannelEvent, History
from mercato.kit.realtime.framing import text_frame
from mercato.kit.realtime.metrics import NullRealtimeHook, RealtimeHook
from mercato.kit.realtime.queue import Offer, OutboundQueue
from mercato.kit.realtime.transport import FrameSink

__all__ = ["Connection"]

_log = get_logger("mercato.realtime.connection")

# How many times a refill re-reads history for a gap that stays open before giving up on it.
_REFILL_ATTEMPTS = 5


# Live events parked while a refill runs; beyond this they are dropped and re-read from history.
_MAX_PENDING = 1000

_NULL_HOOK = NullRealtimeHook()


@dataclass(slots=True)
class _Cursor:
    last: int
    catching_up: bool = False
    pending: list[ChannelEvent] = field(default_factory=list)
    # Pending overflowed: what was dropped is durable, so the refill reads history again.
    reread: bool = False


class Connection:
    """`on_refused` is called once when an essential frame does not fit even above the caps: the
    transport closes the socket with 1013 and the client resumes from its last seq.

    With a `sink` (`attach_sink`: the WebSocket's socket below ASGI, ADR 0063) a frame is written
    straight to the socket while the queue is empty and the transport takes it without waiting;
    otherwise it is queued (caps, drops and the slow-consumer deadline as without a sink) and
    `on_queued` is told, so the transport drains the queue, in order, once the socket is writable.
    Nothing is written directly while the queue holds anything: per-connection order is kept."""

    # Slots: 10,000 idle connections are 10,000 of these (ADR 0056).
    __slots__ = (
        "_cursors",
        "_history",
        "_hook",
        "_on_over",
        "_on_queued",
        "_on_refused",
        "_replay_batch",
        "_tasks",
        "id",
        "kind",
        "queue",
        "refused",
        "sink",
        "slow_consumer_s",
        "user",
    )

    def __init__(
        self,
        *,
        conn_id: str,
        user: str,
        kind: str,
        queue: OutboundQueue,
        history: History,
        on_refused: Callable[[], None],
        hook: RealtimeHook | None = None,
        replay_batch: int = 200,
        slow_consumer_s: float | None = None,
        on_over: Callable[[Connection], None] | None = None,
    ) -> None:
        self.id = conn_id
        self.user = user
        self.kind = kind
        self.queue = queue
        self._history = history
        self._on_refused = on_refused
        self._hook = hook or _NULL_HOOK
        self._replay_batch = replay_batch
        self._cursors: dict[str, _Cursor] = {}
        # Refill tasks, made only when a gap is refilled (None for the idle connection).
        self._tasks: set[asyncio.Task[None]] | None = None
        self.refused = False
        # Over its caps for this long -> closed with 1013 by the hub's sweep (None: never).
        self.slow_consumer_s = slow_consumer_s
        # Told when the queue first goes over its caps (the hub starts watching this connection).
        self._on_over = on_over
        # The socket below ASGI (None: every frame goes through the queue and the transport's writer).
        self.sink: FrameSink | None = None
        self._on_queued: Callable[[], None] | None = None

    def attach_sink(self, sink: FrameSink, on_queued: Callable[[], None]) -> None:
        """Write frames straight to `sink` when nothing is queued; `on_queued()` after queueing one."""
        self.sink = sink
        self._on_queued = on_queued

    @property
    def channels(self) -> list[str]:
        return list(self._cursors)

    def subscribed(self, channel: str) -> bool:
        return channel in self._cursors

    def last_seq(self, channel: str) -> int:
        cursor = self._cursors.get(channel)
        return cursor.last if cursor else 0

    async def subscribe(self, channel: str, *, since: int | None) -> int:
        """Start `channel` at `since` (history after it is replayed first) or, without it, at the
        channel's head (live events only). Returns the head seen at subscription time."""
        head = await self._history.head(channel)
        start = head if since is None else max(0, min(since, head))
        cursor = _Cursor(last=start, catching_up=start < head)
        self._cursors[channel] = cursor
        if since is not None:
            self._hook.resumed()
        if cursor.catching_up:
            await self._refill(channel, cursor)
        return head

    def unsubscribe(self, channel: str) -> None:
        self._cursors.pop(channel, None)

    def send_frame(self, frame: dict[str, object], *, essential: bool = True, at: float = 0.0) -> None:
        """Queue a frame that is not a channel event (ack, error, subscribed, pong)."""
        self._offer(orjson.dumps(frame).decode(), essential=essential, at=at)

    def push(self, event: ChannelEvent) -> bool:
        """Called by the hub for every event on a channel this connection may be subscribed to.
        True when the event's frame went straight to the socket (no queue: the hub then records
        the fan-out's latency once for all such connections)."""
        if event.reply_to and event.reply_to == self.id and event.ack:
            self.send_frame({"type": "ack", **event.ack, "seq": event.seq}, at=event.at)
        cursor = self._cursors.get(event.channel)
        if cursor is None:
            return False
        if not event.seq:
            return self._offer(event.wire(), essential=event.essential, at=event.at, event=event)
        if cursor.catching_up:
            if len(cursor.pending) < _MAX_PENDING:
                cursor.pending.append(event)
            else:
                cursor.reread = True
            return False
        if event.seq <= cursor.last:
            return False
        if event.seq == cursor.last + 1:
            cursor.last = event.seq
            # With a sink, the frame shared by the whole fan-out goes straight to the socket (ADR 0063).
            return self._offer(event.wire(), essential=True, at=event.at, event=event)
        cursor.catching_up = True
        cursor.pending.append(event)
        self._hook.dropped("broker_gap_refilled")
        task = asyncio.create_task(self._refill(event.channel, cursor), name=f"realtime-refill:{self.id}")
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return False

    async def _refill(self, channel: str, cursor: _Cursor) -> None:
        """Replay history after `cursor.last`, then the parked live events, in seq order. The replay
        waits for the queue to drain below its caps between frames: a resuming client is fed as
        fast as it reads, never cut off for being behind on history."""
        try:
            for _attempt in range(_REFILL_ATTEMPTS):
                await self._replay_history(channel, cursor)
                if cursor.reread:
                    cursor.reread = False
                    cursor.pending = []
                    await self._replay_history(channel, cursor)
                pending = sorted(cursor.pending, key=lambda e: e.seq)
                cursor.pending = []
                for index, event in enumerate(pending):
                    if event.seq <= cursor.last:
                        continue
                    if event.seq != cursor.last + 1:
                        cursor.pending = pending[index:]
                        break
                    cursor.last = event.seq
                    self._offer(event.wire(), essential=True, at=event.at, event=event)
                if not cursor.pending and not cursor.reread:
                    return
                await asyncio.sleep(0.05 * (_attempt + 1))
            # History never showed the missing seqs (they were never written): skip past them.
            _log.warning("realtime_gap_skipped", channel=channel, after=cursor.last)
            for event in sorted(cursor.pending, key=lambda e: e.seq):
                if event.seq > cursor.last:
                    cursor.last = event.seq
                    self._offer(event.wire(), essential=True, at=event.at, event=event)
            cursor.pending = []
        finally:
            cursor.catching_up = False

    async def _replay_history(self, channel: str, cursor: _Cursor) -> None:
        while not self.refused:
            try:
                events = await self._history.after(channel, cursor.last, limit=self._replay_batch)
            except HistoryBusy as busy:
                # The process's history reads are all taken (a subscribe storm, ADR 0078): a replay
                # under way (the client was told `subscribed`) or a gap refill waits its turn again.
                await asyncio.sleep(busy.retry_after_s)
                continue
            for event in events:
                if event.seq != cursor.last + 1:
                    continue
                if self.queue.over_cap:
                    await self.queue.wait_below_cap()
                cursor.last = event.seq
                self._offer(event.wire(), essential=True, at=event.at, event=event)
            if len(events) < self._replay_batch:
                return

    def _offer(self, frame: str, *, essential: bool, at: float, event: ChannelEvent | None = None) -> bool:
        """Write `frame` straight to the sink when nothing is queued and the socket takes it (True),
        else queue it (False). `event`: the frame is this event's, whose framed bytes are shared."""
        if self.refused:
            return False
        sink = self.sink
        if (
            sink is not None
            and not self.queue
            and sink.write_frame(event.ws_frame() if event is not None else text_frame(frame.encode()))
        ):
            return True
        result = self.queue.offer(frame, essential=essential, at=at)
        if sink is not None and result is not Offer.DROPPED and result is not Offer.REFUSED:
            assert self._on_queued is not None
            self._on_queued()
        if result is Offer.DROPPED:
            self._hook.dropped("non_essential_queue_full")
        elif result is Offer.OVERFLOW:
            if self._on_over is not None:
                self._on_over(self)
        elif result is Offer.REFUSED:
            self._hook.dropped("connection_refused_essential")
            self.refuse()
        return False

    def refuse(self) -> None:
        """Close this connection as a slow consumer (1013 from the transport), once."""
        if not self.refused:
            self.refused = True
            self._on_refused()

    def close(self) -> None:
        for task in self._tasks or ():
            task.cancel()
        self._cursors.clear()
