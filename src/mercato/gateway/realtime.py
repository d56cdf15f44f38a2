"""Real-time wiring: the hub's lifecycle, the stream consumers that feed it, and `GET /v1/ws`.

The gateway assembles (it may import every context): the order feed (orders) and the chat persister
(chat) run in every API process as members of one consumer group each, so whichever process a
message or saga event landed on, it is persisted once and fanned out to all processes' hubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

from fastapi import APIRouter, WebSocket

from mercato.bootstrap import Container
from mercato.bootstrap.backends import publish_and_ack
from mercato.kit.auth import Principal
from mercato.kit.coordination import LeaseStore
from mercato.kit.messaging import STREAM_CHANNEL, Message
from mercato.kit.observability import get_logger
from mercato.kit.ratelimit import Limit, build_limiter
from mercato.kit.realtime import ChannelEvent, FrameError, SessionSettings, WebSocketSession
from mercato.shop.chat.model import room_channel, room_from_channel
from mercato.shop.chat.service import CHAT_SENDS, ChatPersister, send_message
from mercato.shop.orders.live import OrderFeed
from mercato.shop.orders.model import OrderNotFound

__all__ = ["CHAT_SENDS", "RealtimeRuntime", "router"]

_log = get_logger("mercato.realtime")

router = APIRouter()

_CONSUMER_LEASE = "realtime:consumers"
# What the chat persisters wait on: chat sends, and the stream's own signal (the SQL log's publishes).
_PERSISTER_CHANNELS = (STREAM_CHANNEL, CHAT_SENDS)


def is_staff(principal: Principal) -> bool:
    return principal.has_role("admin")


class SendCoalescer:
    """Chat sends arriving while a stream publish is in flight are published together, in arrival
    order, by the next one: one stream transaction (and one persister wake-up) per burst rather than
    per message (ADR 0056). Each caller returns once its own message is published, or gets the
    publish's error (the session answers `unavailable`; the client re-sends, deduplicated).
    `announce` must not raise (the runtime's logs and swallows a failed NOTIFY).

    `linger_s` (ADR 0092, Kafka's `linger.ms`): while sends come fast enough that at least
    `_LINGER_COMPANIONS` more are expected within it, a burst goes out once its oldest send has
    waited `linger_s` (or it holds `max_batch`), not at once: at ~1,000 sends/s a publish carried
    1.3-1.9 sends, and the publishes, the passes and the broker reads they set off were a quarter
    of the API process's CPU per delivery. Slower, a send is never held (nothing would join it)."""

    def __init__(
        self,
        publish: Callable[[list[Message]], Awaitable[None]],
        announce: Callable[[], Awaitable[None]],
        *,
        max_batch: int = 500,
        linger_s: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        if linger_s < 0:
            raise ValueError("linger_s must not be negative")
        self._publish = publish
        self._announce = announce
        self.max_batch = max_batch
        self.linger_s = linger_s
        # (message, its caller's future, when it arrived on the loop's clock)
        self._pending: list[tuple[Message, asyncio.Future[None], float]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._announcing: set[asyncio.Future[None]] = set()  # held until done (the loop keeps weak refs)
        # Sends per second over the last window of at least `_RATE_WINDOW_S`.
        self.send_rate = 0.0
        self._window_start = 0.0
        self._window_sends = 0
        self._full: asyncio.Future[None] | None = None  # set while lingering: a full batch ends it

    async def publish(self, message: Message) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._count_send(now)
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((message, done, now))
        if self._full is not None and len(self._pending) >= self.max_batch:
            _settle(self._full)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="chat-send-coalescer")
        await done

    def _count_send(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed >= _RATE_WINDOW_S:
            self.send_rate = self._window_sends / elapsed
            self._window_start, self._window_sends = now, 0
        self._window_sends += 1

    async def _linger(self) -> None:
        """Wait until the oldest pending send has waited `linger_s`, while others are expected."""
        if self.linger_s <= 0 or self.send_rate * self.linger_s < _LINGER_COMPANIONS:
            return
        loop = asyncio.get_running_loop()
        wait = self._pending[0][2] + self.linger_s - loop.time()
        if wait <= 0 or len(self._pending) >= self.max_batch:
            return
        self._full = full = loop.create_future()
        timer = loop.call_later(wait, _settle, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None

    async def _flush(self) -> None:
        while self._pending:
            await self._linger()
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                await self._publish([message for message, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting sender
                for _, done, _ in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for _, done, _ in batch:
                if not done.done():
                    done.set_result(None)
            # Not awaited (ADR 0070): the next burst's publish no longer waits for this one's NOTIFY
            # round trip. The wake-up starts at once (the local fire is the announcement's first
            # step) and `WorkSignals.announce` folds announcements made meanwhile into one more.
            announcing = asyncio.ensure_future(self._announce())
            self._announcing.add(announcing)
            announcing.add_done_callback(self._announcing.discard)


# The send rate is measured over windows of this length (a burst after an idle spell is not held
# until a window has seen the rate), and a send is held only when this many more are expected.
_RATE_WINDOW_S = 0.1
_LINGER_COMPANIONS = 2


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RealtimeRuntime:
    """Starts the hub and the consumers feeding it; `stop` undoes it (the app's lifespan)."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._leader = asyncio.Event()
        self._leases = LeaseStore(container.db, container.clock)
        realtime = container.settings.realtime
        self.send_limiter = build_limiter("token_bucket", "memory", clock=container.clock)
        self.send_limit = Limit(rate=realtime.send_rate_per_s, period_s=1, burst=realtime.send_burst)
        self.room_limit = Limit(rate=realtime.room_rate_per_s, period_s=1)
        self._sends = SendCoalescer(
            container.stream.publish, self._announce, linger_s=realtime.send_linger_ms / 1000
        )

    @property
    def _announce_across_processes(self) -> bool:
        """Whether a send must wake other processes' persisters (a NOTIFY per send burst, ADR 0077).
        On the SQL log and Redis Streams with sequential passes it need not: this process's
        persister can read every partition, and is woken locally; a partition another process's
        pass holds is read again by that process's loop, which reads after every busy pass. Under
        JetStream one process holds the readers' lease, and overlapped passes (ADR 0070) sleep
        after a pass until a signal: both need the NOTIFY."""
        return self._single_reader or self.container.settings.realtime.overlap_persister_passes

    async def _announce(self) -> None:
        signals = self.container.db.signals
        if not self._announce_across_processes:
            signals.fire(CHAT_SENDS)
            return
        # Wake the chat persisters (whichever process's holds the room's partition) at once.
        try:
            await signals.announce(CHAT_SENDS)
        except Exception:  # noqa: BLE001 - published already; the persisters' safety poll finds it
            _log.warning("chat_announce_failed", exc_info=True)

    async def start(self) -> None:
        c = self.container
        await c.hub.start()
        # A removed member stops sending (membership cache) and receiving (its subscriptions) in
        # every process once the revocation reaches that process's hub (ADR 0056).
        c.chat.on_member_removed(self._revoke)
        c.hub.on_revoked(self._forget)
        consumer = c.hub.node_id
        feed = OrderFeed(
            c.stream, c.channel_history, c.hub.publish_many, consumer=consumer, hook=c.messaging_hook
        )
        persister = ChatPersister(
            c.chat,
            c.stream,
            c.hub.publish_many,
            consumer=consumer,
            hook=c.messaging_hook,
            wakeups=lambda: sum(c.db.signals.mark(_PERSISTER_CHANNELS)),
            publish_and_ack=publish_and_ack(c.hub, c.stream),
            fan_out_here_first=c.hub.fan_out_here_first,
        )
        poll_s = c.settings.realtime.consumer_poll_s
        self._tasks = [
            asyncio.create_task(self._loop("order_feed", feed.run_once, poll_s, (STREAM_CHANNEL,))),
            asyncio.create_task(
                # Overlapped when configured (ADR 0070): a pass is read and persisted while the one
                # before it is published and acknowledged.
                self._loop(
                    "chat_persist",
                    self._persist_step(persister),
                    poll_s,
                    _PERSISTER_CHANNELS,
                    warm=c.chat.warm,
                )
            ),
        ]
        if self._single_reader:
            self._tasks.append(asyncio.create_task(self._hold_lease(consumer)))
        else:
            self._leader.set()

    def _persist_step(self, persister: ChatPersister) -> Callable[[], Awaitable[int]]:
        overlap = self.container.settings.realtime.overlap_persister_passes
        return persister.run_overlapped if overlap else persister.run_once

    @property
    def _single_reader(self) -> bool:
        """JetStream 2.9 has no single-active consumer: two processes reading one partition can each
        hold a batch, and a room's (or an order's) messages would be persisted out of order (see
        kit/messaging/nats_jetstream.py). There, one process at a time runs these consumers, under a
        lease; the SQL log and Redis Streams keep one batch per partition across processes themselves."""
        return self.container.settings.messaging.backend == "nats"

    async def _hold_lease(self, holder: str) -> None:
        ttl_s = self.container.settings.realtime.presence_ttl_s
        while not self._stop.is_set():
            try:
                lease = await self._leases.acquire(_CONSUMER_LEASE, holder, ttl_s=ttl_s)
            except Exception:  # noqa: BLE001 - database away: not the leader until it answers
                _log.exception("realtime_lease_failed")
                lease = None
            if lease is None:
                self._leader.clear()
            else:
                self._leader.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=ttl_s / 3)

    async def _loop(
        self,
        name: str,
        run_once: Callable[[], Awaitable[int]],
        poll_s: float,
        channels: tuple[str, ...],
        *,
        warm: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        signals = self.container.db.signals
        if warm is not None:
            # Off the startup path: a database away now only means the first pass prepares instead.
            try:
                await asyncio.wait_for(warm(), timeout=poll_s)
            except Exception:  # noqa: BLE001 - the passes work cold as well
                _log.warning("realtime_consumer_warm_failed", consumer=name, exc_info=True)
        while not self._stop.is_set():
            await self._leader.wait()
            mark = signals.mark(channels)
            try:
                handled = await run_once()
            except Exception:  # noqa: BLE001 - a failed pass (database or broker away) is retried
                _log.exception("realtime_consumer_failed", consumer=name)
                handled = 0
                await asyncio.sleep(1.0)
            if not handled:
                # Woken by messages reaching the stream (this process, or NOTIFY from the worker's
                # relay on PostgreSQL; kit/storage/signals.py); `poll_s` is the safety poll.
                await signals.wait(channels, since=mark, timeout_s=poll_s, stop=self._stop)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.container.hub.stop()

    async def _revoke(self, room_id: uuid.UUID, user_id: str) -> None:
        await self.container.hub.revoke(room_channel(room_id), user_id)

    def _forget(self, channel: str, user_id: str) -> None:
        room_id = room_from_channel(channel)
        if room_id is not None:
            self.container.chat.membership.forget(room_id, user_id)

    # -- the WebSocket protocol's shop side -----------------------------------------------------

    async def authorize(self, principal: Principal, channel: str) -> bool:
        c = self.container
        room_id = room_from_channel(channel)
        if room_id is not None:
            return await c.chat.may_read(room_id, principal.subject, staff=is_staff(principal))
        if channel.startswith("order:"):
            try:
                order_id = uuid.UUID(channel[len("order:") :])
                customer = None if is_staff(principal) else uuid.UUID(principal.subject)
                await c.orders.get(order_id, customer_id=customer, read_all=is_staff(principal))
            except (ValueError, OrderNotFound):
                return False
            return True
        return False

    def _room(self, session: WebSocketSession, frame: dict[str, Any]) -> uuid.UUID:
        try:
            return uuid.UUID(str(frame.get("room", "")))
        except ValueError as exc:
            raise FrameError("invalid", "`room` is a room id") from exc

    async def send(self, session: WebSocketSession, frame: dict[str, Any]) -> None:
        c = self.container
        assert session.principal is not None
        assert session.conn is not None
        room_id = self._room(session, frame)
        text, client_msg_id = frame.get("text"), frame.get("client_msg_id")
        if not isinstance(text, str) or not text.strip() or len(text) > c.settings.realtime.max_text_chars:
            raise FrameError("invalid", f"`text` is 1..{c.settings.realtime.max_text_chars} characters")
        if not isinstance(client_msg_id, str) or not 1 <= len(client_msg_id) <= 100:
            raise FrameError("invalid", "`client_msg_id` is a string of 1..100 characters")
        if not await self.authorize(session.principal, room_channel(room_id)):
            raise FrameError("forbidden", "not a member of this room")
        for key, limit in (
            (f"ws:conn:{session.conn.id}", self.send_limit),
            (f"ws:room:{room_id}", self.room_limit),
        ):
            decision = await self.send_limiter.hit(key, limit)
            if not decision.allowed:
                raise FrameError("rate_limited", f"slow down: retry after {decision.retry_after_s:.1f} s")
        await self._sends.publish(
            send_message(
                room_id=room_id,
                sender=session.principal.subject,
                text=text,
                client_msg_id=client_msg_id,
                reply_to=session.conn.id,
                now=c.clock.now(),
            )
        )

    async def typing(self, session: WebSocketSession, frame: dict[str, Any]) -> None:
        assert session.principal is not None
        assert session.conn is not None
        room_id = self._room(session, frame)
        if not session.conn.subscribed(room_channel(room_id)):
            raise FrameError("forbidden", "subscribe to the room first")
        decision = await self.send_limiter.hit(f"ws:typing:{session.conn.id}", self.send_limit)
        if decision.allowed:
            await self.container.hub.publish(
                ChannelEvent(
                    room_channel(room_id),
                    "typing",
                    {"room": str(room_id), "user": session.principal.subject},
                    essential=False,
                )
            )


async def websocket_endpoint(websocket: WebSocket) -> None:
    runtime = cast(RealtimeRuntime, websocket.app.state.realtime)
    c = runtime.container
    realtime = c.settings.realtime
    session = WebSocketSession(
        websocket,
        c.hub,
        authenticate=c.token_codec.verify,
        authorize=runtime.authorize,
        handlers={"send": runtime.send, "typing": runtime.typing},
        settings=SessionSettings(
            auth_timeout_s=realtime.auth_timeout_s,
            max_frame_bytes=realtime.max_frame_bytes,
            slow_consumer_s=realtime.slow_consumer_s,
        ),
    )
    await session.run()


# A plain Starlette route, not FastAPI's `@router.websocket`: the endpoint takes no dependencies, and
# FastAPI's dependency machinery kept two exit stacks and their frames alive in every open
# connection's task (~2 KiB per idle connection, ADR 0063).
router.add_websocket_route("/v1/ws", websocket_endpoint)
