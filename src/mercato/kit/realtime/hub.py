"""The process-local hub: connection registry, channel membership, fan-out and shared presence.

Every process runs one hub subscribed to the `Broker`; a publish anywhere reaches every hub, and
each hub hands the event only to its own connections subscribed to that channel (no broadcast to
everyone: guide §23's anti-pattern).

Presence is shared through the broker too: each hub announces, per channel, the users it holds,
on every join/leave and every `presence_interval_s` (the heartbeat); an announcement expires after
`presence_ttl_s`, so a killed process's users disappear within one TTL without anyone cleaning up.
Presence frames are non-essential: the first thing a slow connection loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable

from mercato.kit.observability import get_logger
from mercato.kit.realtime.admission import GatedHistory, HistoryGate
from mercato.kit.realtime.broker import Broker, Subscription
from mercato.kit.realtime.connection import Connection
from mercato.kit.realtime.events import ChannelEvent, History
from mercato.kit.realtime.metrics import NullRealtimeHook, RealtimeHook
from mercato.kit.realtime.queue import OutboundQueue

__all__ = ["ACCESS_REVOKED", "PRESENCE_ANNOUNCE", "Hub"]

_log = get_logger("mercato.realtime.hub")

PRESENCE_ANNOUNCE = "presence.announce"
# A control event: `data.user` may no longer read `channel`. Every hub unsubscribes that user's
# connections from it and tells its `on_revoked` listeners (the membership cache forgets the pair).
ACCESS_REVOKED = "access.revoked"

# The "caps" of an unbounded queue (`bounded=False`): never reached.
_UNBOUNDED = 1 << 62


class Hub:
    def __init__(
        self,
        broker: Broker,
        history: History,
        *,
        node_id: str,
        hook: RealtimeHook | None = None,
        presence_interval_s: float = 10.0,
        presence_ttl_s: float = 25.0,
        max_messages: int = 1000,
        max_bytes: int = 1 << 20,
        bounded: bool = True,
        history_gate: HistoryGate | None = None,
    ) -> None:
        self.broker = broker
        # `history` as given (an HTTP read of it has its own pool wait); the subscriptions' reads
        # go through `history_gate` (ADR 0078): a subscribe storm never holds the whole pool.
        self.history = history
        self.history_gate = history_gate
        self._subscriber_history: History = (
            history if history_gate is None else GatedHistory(history, history_gate)
        )
        self.node_id = node_id
        self.hook = hook or NullRealtimeHook()
        self.presence_interval_s = presence_interval_s
        self.presence_ttl_s = presence_ttl_s
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        # False: outbound queues without caps (a lab's control run: what the caps prevent).
        self.bounded = bounded
        self.connections: dict[str, Connection] = {}
        self._channels: dict[str, set[Connection]] = {}
        self._local_presence: dict[str, Counter[str]] = {}
        self._remote_presence: dict[str, dict[str, tuple[frozenset[str], float]]] = {}
        self._online: dict[str, list[str]] = {}
        self._ids = itertools.count(1)
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Connections whose queue went over its caps: the one slow-consumer sweep watches only these
        # (no watchdog task per connection; nothing runs while every queue is under its caps).
        self._lagging: set[Connection] = set()
        self._lag_wakeup: asyncio.Event | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._revoked_listeners: list[Callable[[str, str], None]] = []

    async def start(self) -> None:
        self._subscription = await self.broker.subscribe()
        self._tasks = [
            asyncio.create_task(self._pump(self._subscription), name="realtime-hub-pump"),
            asyncio.create_task(self._heartbeat(), name="realtime-hub-presence"),
            asyncio.create_task(self._sweep_slow_consumers(), name="realtime-hub-slow-consumers"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._subscription is not None:
            await self.broker.unsubscribe(self._subscription)

    # -- connections ---------------------------------------------------------------------------

    def queued_bytes(self) -> int:
        """Bytes waiting in every connection's outbound queue (a frame shared by N queues counts N times)."""
        return sum(conn.queue.size_bytes for conn in list(self.connections.values()))

    def connect(
        self,
        user: str,
        *,
        kind: str,
        on_refused: Callable[[], None],
        max_messages: int | None = None,
        max_bytes: int | None = None,
        slow_consumer_s: float | None = None,
    ) -> Connection:
        """`slow_consumer_s`: a connection whose queue stays over its caps this long is refused
        (`on_refused`: the transport closes it with 1013); None: only the hard cap refuses it."""
        if self.bounded:
            queue = OutboundQueue(
                max_messages=max_messages or self.max_messages, max_bytes=max_bytes or self.max_bytes
            )
        else:
            queue = OutboundQueue(max_messages=_UNBOUNDED, max_bytes=_UNBOUNDED)
        conn = Connection(
            conn_id=f"{self.node_id}/{next(self._ids)}",
            user=user,
            kind=kind,
            queue=queue,
            history=self._subscriber_history,
            on_refused=on_refused,
            hook=self.hook,
            slow_consumer_s=slow_consumer_s,
            on_over=self._watch_lagging if slow_consumer_s is not None else None,
        )
        self.connections[conn.id] = conn
        self.hook.connected(kind, 1)
        return conn

    async def disconnect(self, conn: Connection) -> None:
        self._lagging.discard(conn)
        if self.connections.pop(conn.id, None) is None:
            return
        self.hook.connected(conn.kind, -1)
        try:
            for channel in conn.channels:
                await self.unsubscribe(conn, channel)
        finally:
            conn.close()

    async def subscribe(
        self, conn: Connection, channel: str, *, since: int | None, presence: bool = False
    ) -> int:
        """Subscribe `conn` (history after `since` first); with `presence` its user counts as online.
        `HistoryBusy` (no history read slot in time, ADR 0078) leaves it unsubscribed from `channel`."""
        was_subscribed = conn.subscribed(channel)
        self._channels.setdefault(channel, set()).add(conn)
        try:
            head = await conn.subscribe(channel, since=since)
        except BaseException:
            if not was_subscribed:
                self._leave(conn, channel)
            raise
        if presence:
            counter = self._local_presence.setdefault(channel, Counter())
            counter[conn.user] += 1
            if counter[conn.user] == 1:
                await self._announce(channel)
        return head

    def subscribe_slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A history read slot for a subscribe's other database reads (its authorization)."""
        gate = self.history_gate
        return gate.slot() if gate is not None else contextlib.nullcontext()

    @property
    def subscriber_history(self) -> History:
        """`history` through the gate: what a subscription reads."""
        return self._subscriber_history

    def _leave(self, conn: Connection, channel: str) -> None:
        """`conn` off `channel`'s members (the channel forgotten with its last) and unsubscribed."""
        members = self._channels.get(channel)
        if members is not None:
            members.discard(conn)
            if not members:
                del self._channels[channel]
        conn.unsubscribe(channel)

    async def unsubscribe(self, conn: Connection, channel: str) -> None:
        self._leave(conn, channel)
        counter = self._local_presence.get(channel)
        if counter is not None and conn.user in counter:
            counter[conn.user] -= 1
            if counter[conn.user] <= 0:
                del counter[conn.user]
                if not counter and self._local_presence.get(channel) is counter:
                    # Before the await: another disconnect may run while this one announces.
                    del self._local_presence[channel]
                await self._announce(channel)

    async def publish(self, event: ChannelEvent) -> None:
        await self.broker.publish(event)

    async def publish_many(self, events: list[ChannelEvent]) -> None:
        """Several events in publish order, in one broker round trip where the adapter has one."""
        await self.broker.publish_many(events)

    def fan_out_here_first(self, events: list[ChannelEvent]) -> list[ChannelEvent]:
        """Fan durable `events` out to this process's connections now, and return them marked for
        the broker (ADR 0085): every other hub fans them out when the broker brings them, this one
        skips them then. Its members no longer wait for the broker's round trip and this hub's read
        of it; a connection takes each seq once whichever way it comes first."""
        for event in events:
            try:
                self.fan_out(event)
            except Exception:  # noqa: BLE001 - as in `_pump`: one bad event never stops the others
                _log.exception("realtime_fan_out_failed", channel=event.channel)
        return [
            dataclasses.replace(event, origin=self.node_id, fanned_out_at_origin=True) for event in events
        ]

    async def revoke(self, channel: str, user: str) -> None:
        """Tell every process that `user` may no longer read `channel` (see ACCESS_REVOKED)."""
        await self.broker.publish(
            ChannelEvent(channel=channel, type=ACCESS_REVOKED, data={"user": user}, origin=self.node_id)
        )

    def on_revoked(self, listener: Callable[[str, str], None]) -> None:
        """`listener(channel, user)` runs in every process when a revocation reaches its hub."""
        if listener not in self._revoked_listeners:
            self._revoked_listeners.append(listener)

    def _revoked(self, event: ChannelEvent) -> None:
        user = str(event.data.get("user", ""))
        for listener in self._revoked_listeners:
            try:
                listener(event.channel, user)
            except Exception:  # noqa: BLE001 - one listener's failure never blocks the unsubscribe
                _log.exception("realtime_revoke_listener_failed")
        for conn in list(self._channels.get(event.channel, ())):
            if conn.user == user:
                # Synchronously out of the channel (no later event reaches it), then the presence.
                conn.unsubscribe(event.channel)
                conn.send_frame({"type": "unsubscribed", "channel": event.channel, "reason": "revoked"})
                task = asyncio.get_running_loop().create_task(self.unsubscribe(conn, event.channel))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    # -- slow consumers ------------------------------------------------------------------------

    def _watch_lagging(self, conn: Connection) -> None:
        self._lagging.add(conn)
        if self._lag_wakeup is not None:
            self._lag_wakeup.set()

    async def _sweep_slow_consumers(self) -> None:
        """Close (1013) every connection over its caps for longer than its `slow_consumer_s`: one
        task for the whole hub, asleep while no queue is over its caps."""
        self._lag_wakeup = asyncio.Event()
        while True:
            if not self._lagging:
                self._lag_wakeup.clear()
                await self._lag_wakeup.wait()
            now = time.monotonic()
            step = 1.0
            for conn in list(self._lagging):
                since, limit = conn.queue.over_since, conn.slow_consumer_s
                if not since or limit is None or conn.refused:
                    self._lagging.discard(conn)
                    continue
                step = min(step, max(0.05, limit / 10))
                if now - since >= limit:
                    self._lagging.discard(conn)
                    conn.refuse()  # the transport counts it (slow_consumer_closed) and closes 1013
            await asyncio.sleep(step)

    # -- fan-out -------------------------------------------------------------------------------

    async def _pump(self, subscription: Subscription) -> None:
        async for event in subscription:
            if event.fanned_out_at_origin and event.origin == self.node_id:
                continue  # fanned out here before it was published (`fan_out_here_first`)
            try:
                self.fan_out(event)
            except Exception:  # noqa: BLE001 - one bad event never stops delivery to everyone
                _log.exception("realtime_fan_out_failed", channel=event.channel)

    def fan_out(self, event: ChannelEvent) -> None:
        if event.type == PRESENCE_ANNOUNCE:
            self._remember_presence(event)
            return
        if event.type == ACCESS_REVOKED:
            self._revoked(event)
            return
        members = self._channels.get(event.channel, set())
        direct = False
        for conn in list(members):
            if conn.push(event):
                direct = True
        if direct and event.at:
            # Once per fan-out for the connections written straight to (queued frames: per frame).
            self.hook.fanout_latency(time.time() - event.at)
        if event.reply_to and event.ack:
            # The sender is acknowledged even when it is not subscribed to the channel.
            sender = self.connections.get(event.reply_to)
            if sender is not None and sender not in members:
                sender.push(event)

    # -- presence ------------------------------------------------------------------------------

    def online(self, channel: str) -> list[str]:
        return list(self._online.get(channel, []))

    def _announcement(self, channel: str) -> ChannelEvent:
        users = sorted(self._local_presence.get(channel, ()))
        return ChannelEvent(
            channel=channel,
            type=PRESENCE_ANNOUNCE,
            data={"node": self.node_id, "users": users},
            essential=False,
            origin=self.node_id,
        )

    async def _announce(self, channel: str) -> None:
        event = self._announcement(channel)
        try:
            await self.broker.publish(event)
        except Exception:  # noqa: BLE001 - presence is best effort; the next heartbeat repeats it
            _log.warning("presence_announce_failed", channel=channel)

    def _remember_presence(self, event: ChannelEvent) -> None:
        node = str(event.data.get("node", event.origin))
        users = frozenset(str(u) for u in event.data.get("users", []))
        nodes = self._remote_presence.setdefault(event.channel, {})
        if users:
            nodes[node] = (users, time.monotonic() + self.presence_ttl_s)
        else:
            nodes.pop(node, None)
        self._refresh_presence(event.channel)

    def _refresh_presence(self, channel: str) -> None:
        now = time.monotonic()
        nodes = self._remote_presence.get(channel, {})
        for node in [n for n, (_, expires) in nodes.items() if expires < now]:
            del nodes[node]
        online = sorted(set().union(*(users for users, _ in nodes.values())))
        if not nodes:
            self._remote_presence.pop(channel, None)
        if online == self._online.get(channel, []):
            return
        if online:
            self._online[channel] = online
        else:
            self._online.pop(channel, None)
        frame = ChannelEvent(
            channel=channel,
            type="presence",
            data={"room": channel.partition(":")[2], "online": online},
            essential=False,
        )
        for conn in list(self._channels.get(channel, ())):
            conn.push(frame)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.presence_interval_s)
            # Every channel's announcement in one broker round trip (was one per channel).
            events = [self._announcement(channel) for channel in list(self._local_presence)]
            if events:
                try:
                    await self.broker.publish_many(events)
                except Exception:  # noqa: BLE001 - presence is best effort; the next heartbeat repeats it
                    _log.warning("presence_announce_failed", channels=len(events))
            for channel in list(self._remote_presence):
                self._refresh_presence(channel)
