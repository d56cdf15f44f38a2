"""The WebSocket session: authenticate on connect, then read frames and write the outbound queue.

The session's own coroutine reads. Under a server that offers the socket below ASGI (`transport.py`,
`mercato api`'s uvicorn protocol) frames are written straight to it and a drain task exists only while
the connection's `OutboundQueue` holds frames (ADR 0063); otherwise one writer task drains the queue
through ASGI `send` (ADR 0056). TCP flow control is what holds either for a slow client. The reader
stops reading while the queue is over its caps (pausing reads: a client that does not read gets no
say either), and the hub's one slow-consumer sweep refuses the connection when
its queue stays over its caps for `slow_consumer_s` (the session then closes the socket with 1013
"try again later"), as the queue does at once when an essential frame does not fit at all.
Every close carries a code from `CloseCode`; every bad frame gets an error frame
`{"type":"error","code":...,"detail":...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from mercato.kit.auth import InvalidToken, Principal
from mercato.kit.observability import get_logger
from mercato.kit.realtime.admission import HistoryBusy
from mercato.kit.realtime.connection import Connection
from mercato.kit.realtime.framing import text_frame
from mercato.kit.realtime.hub import Hub
from mercato.kit.realtime.transport import FrameSink, frame_sink

__all__ = ["CloseCode", "FrameError", "FrameHandler", "SessionSettings", "WebSocketSession"]

_log = get_logger("mercato.realtime.ws")


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013
    UNAUTHENTICATED = 4401


class FrameError(Exception):
    """A frame the server refuses: answered with an error frame, the connection stays open."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


FrameHandler = Callable[["WebSocketSession", dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SessionSettings:
    auth_timeout_s: float = 5.0
    max_frame_bytes: int = 16_384
    slow_consumer_s: float = 10.0
    max_subscriptions: int = 100


class WebSocketSession:
    __slots__ = (
        "_authenticate",
        "_authorize",
        "_handlers",
        "_reading",
        "_stopping",
        "_writer",
        "conn",
        "hub",
        "principal",
        "settings",
        "websocket",
    )

    def __init__(
        self,
        websocket: WebSocket,
        hub: Hub,
        *,
        authenticate: Callable[[str], Principal],
        authorize: Callable[[Principal, str], Awaitable[bool]],
        handlers: Mapping[str, FrameHandler],
        settings: SessionSettings = SessionSettings(),
    ) -> None:
        self.websocket = websocket
        self.hub = hub
        self._authenticate = authenticate
        self._authorize = authorize
        self._handlers = handlers
        self.settings = settings
        self.principal: Principal | None = None
        self.conn: Connection | None = None
        # The task running `run` while it reads (cancelled to stop reading: a close from elsewhere).
        self._reading: asyncio.Task[Any] | None = None
        self._stopping = False
        self._writer: asyncio.Task[None] | None = None

    async def run(self) -> None:
        await self.websocket.accept()
        principal = await self._authenticate_client()
        if principal is None:
            return
        self.principal = principal
        conn = self.hub.connect(
            principal.subject,
            kind="ws",
            on_refused=self._refused,
            slow_consumer_s=self.settings.slow_consumer_s,
        )
        self.conn = conn
        sink = frame_sink(self.websocket.scope)
        if sink is not None:
            # Frames go straight to the socket; a drain task exists only while frames are queued.
            conn.attach_sink(sink, self._queued)
        else:
            self._writer = asyncio.create_task(self._write(conn), name=f"ws-writer:{conn.id}")
        conn.send_frame({"type": "ready", "user": principal.subject, "connection": conn.id})
        self._reading = asyncio.current_task()
        try:
            await self._read(conn)
        except asyncio.CancelledError:
            # Our own stop (a close from the sweep or the writer) ends reading; anyone else's
            # cancellation (server shutdown) goes on up once the connection is cleaned up.
            reading = self._reading
            if not self._stopping or reading is None or reading.uncancel() > 0:
                raise
        finally:
            self._reading = None
            writer = self._writer
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            await self.hub.disconnect(conn)
            await self.close(CloseCode.GOING_AWAY, "server closing")

    def _stop_reading(self) -> None:
        reading = self._reading
        if reading is not None and not self._stopping and reading is not asyncio.current_task():
            self._stopping = True
            reading.cancel()

    async def close(self, code: int, reason: str) -> None:
        self._stop_reading()
        if self.websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.websocket.close(code=code, reason=reason), timeout=2.0)

    def error(self, code: str, detail: str) -> None:
        if self.conn is not None:
            self.conn.send_frame({"type": "error", "code": code, "detail": detail})

    # -- authentication ------------------------------------------------------------------------

    async def _authenticate_client(self) -> Principal | None:
        header = self.websocket.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            try:
                message = await asyncio.wait_for(
                    self.websocket.receive(), timeout=self.settings.auth_timeout_s
                )
            except TimeoutError:
                await self.close(CloseCode.UNAUTHENTICATED, "authenticate within 5 s")
                return None
            if message["type"] == "websocket.disconnect":
                return None
            frame = _parse(message.get("text"), self.settings.max_frame_bytes)
            if frame is None or frame.get("type") != "auth" or not isinstance(frame.get("token"), str):
                await self.close(CloseCode.POLICY, "the first frame must be {type: auth, token}")
                return None
            token = frame["token"]
        try:
            return self._authenticate(token)
        except InvalidToken:
            await self.close(CloseCode.UNAUTHENTICATED, "invalid or expired token")
            return None

    # -- reading -------------------------------------------------------------------------------

    async def _read(self, conn: Connection) -> None:
        while True:
            if conn.queue.over_cap:
                # Pause reads: a client that does not drain what we send gets nothing more read.
                await conn.queue.wait_below_cap()
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.error("unsupported", "frames are JSON text")
                continue
            if len(text) > self.settings.max_frame_bytes:
                self.error("too_large", f"frames are at most {self.settings.max_frame_bytes} bytes")
                continue
            frame = _parse(text, self.settings.max_frame_bytes)
            if frame is None:
                self.error("malformed", "a frame is a JSON object with a string `type`")
                continue
            try:
                await self._dispatch(conn, frame)
            except FrameError as exc:
                self.error(exc.code, exc.detail)
            except Exception:  # noqa: BLE001 - one frame's failure never takes the connection down
                _log.exception("ws_frame_failed", type=frame.get("type"))
                self.error("unavailable", "could not handle the frame; try again")

    async def _dispatch(self, conn: Connection, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "subscribe":
            await self._subscribe(conn, frame)
        elif kind == "unsubscribe":
            await self.hub.unsubscribe(conn, str(frame.get("channel", "")))
            conn.send_frame({"type": "unsubscribed", "channel": frame.get("channel")})
        elif kind == "ping":
            conn.send_frame({"type": "pong"})
        elif kind in self._handlers:
            await self._handlers[kind](self, frame)
        else:
            raise FrameError("unknown_type", f"unknown frame type {str(kind)[:40]!r}")

    async def _subscribe(self, conn: Connection, frame: dict[str, Any]) -> None:
        channel = frame.get("channel")
        since = frame.get("since")
        if not isinstance(channel, str) or not channel or len(channel) > 200:
            raise FrameError("invalid", "subscribe needs a `channel`")
        if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
            raise FrameError("invalid", "`since` is a seq: an integer >= 0")
        if len(conn.channels) >= self.settings.max_subscriptions and not conn.subscribed(channel):
            raise FrameError("too_many_subscriptions", "unsubscribe from a channel first")
        assert self.principal is not None
        try:
            # Every database read of a subscribe takes one of the process's history read slots
            # (ADR 0078): a storm of subscribes queues there instead of holding the whole pool.
            async with self.hub.subscribe_slot():
                allowed = await self._authorize(self.principal, channel)
            if not allowed:
                raise FrameError("forbidden", f"not a member of {channel}")
            head = await self.hub.subscriber_history.head(channel)
            conn.send_frame(
                {"type": "subscribed", "channel": channel, "head": head, "online": self.hub.online(channel)}
            )
            await self.hub.subscribe(conn, channel, since=since, presence=True)
        except HistoryBusy as busy:
            # Busy, not down: the client subscribes again (with its `since`) and loses nothing.
            self.hub.hook.dropped("subscribe_try_again")
            conn.send_frame(
                {
                    "type": "error",
                    "code": "try_again",
                    "channel": channel,
                    "retry_after_s": busy.retry_after_s,
                    "detail": "the server is busy subscribing others; subscribe again shortly",
                }
            )

    # -- writing -------------------------------------------------------------------------------

    async def _write(self, conn: Connection) -> None:
        send = self.websocket.send_text
        hook = self.hub.hook
        try:
            while True:
                frame, at = await conn.queue.get()
                await send(frame if isinstance(frame, str) else frame.decode())
                if at:
                    hook.fanout_latency(time.time() - at)
        except Exception:  # noqa: BLE001 - the socket is gone: stop reading, `run` cleans up
            self._stop_reading()

    def _queued(self) -> None:
        writer = self._writer
        if (writer is None or writer.done()) and self.conn is not None and self.conn.sink is not None:
            self._writer = asyncio.create_task(self._drain(self.conn, self.conn.sink))

    async def _drain(self, conn: Connection, sink: FrameSink) -> None:
        """Write the queued frames, oldest first, each once the socket's write buffer has room
        (TCP flow control is what holds a slow client here), then end: an idle or keeping-up
        connection has no writer task (ADR 0063)."""
        queue = conn.queue
        hook = self.hub.hook
        while queue:
            await sink.wait_writable()
            if not sink.open or not queue:
                break
            # No await from here to the write: nothing can be written to the socket in between.
            frame, at = queue.pop()
            sink.write_frame(frame if isinstance(frame, bytes) else text_frame(frame.encode()))
            if at:
                hook.fanout_latency(time.time() - at)
        if not sink.open:
            self._stop_reading()

    def _refused(self) -> None:
        self.hub.hook.slow_consumer_closed()
        asyncio.get_running_loop().create_task(
            self.close(CloseCode.TRY_AGAIN_LATER, "too slow: resume from your last seq")
        )


def _parse(text: str | None, max_bytes: int) -> dict[str, Any] | None:
    if text is None or len(text) > max_bytes:
        return None
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        return None
    return frame
