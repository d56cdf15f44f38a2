"""The fan-out write below ASGI: pre-framed WebSocket bytes written straight to the socket (ADR 0063).

Under ASGI every delivery is a `websocket.send` message through the app's `send` callable and the
server's protocol, which frames it again for each connection: ~60-70 µs of CPU per delivery on the
bench VM (docs/benchmarks.md, h-rt3). A fanned-out event is the same frame for every connection (no
compression: the server never negotiates it, ADR 0038), so it is framed once (`text_frame`, cached on
the `ChannelEvent`) and each connection's transport gets the same bytes, as `websockets.broadcast`
does.

`MercatoWebSocketProtocol` is uvicorn's own `websockets` sans-I/O protocol (`mercato api` passes it as
uvicorn's `ws` protocol class, a documented uvicorn setting) that announces itself to the app as the
ASGI scope extension `mercato.ws.frames`: a `FrameSink`. The session uses it when present and
falls back to ASGI `send` otherwise (another server, a test client, permessage-deflate negotiated).
It also forgets the handshake's request and response once the connection is open (they are not
read again), which is memory every idle connection held.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import Protocol as WebSocketsProtocol
from websockets.protocol import State
from websockets.streams import StreamReader

__all__ = ["FRAMES_EXTENSION", "FrameSink", "MercatoWebSocketProtocol", "frame_sink"]

# The ASGI scope extension naming this connection's `FrameSink`.
FRAMES_EXTENSION = "mercato.ws.frames"


class FrameSink(Protocol):
    """A connection's socket, for frames framed once per fan-out."""

    def write_frame(self, frame: bytes) -> bool:
        """Write a complete text frame now. False when the transport is over its write-buffer mark
        (the caller queues it, and drains the queue after `wait_writable`). True also when the
        connection is closing or gone: nothing more is delivered to it, as with ASGI `send`."""
        ...

    @property
    def open(self) -> bool:
        """Still accepting frames (no close sent or received, the transport not lost)."""
        ...

    async def wait_writable(self) -> None:
        """Until the transport's write buffer is below its low-water mark (or the connection is lost)."""
        ...


def frame_sink(scope: dict[str, Any] | Any) -> FrameSink | None:
    """This WebSocket connection's `FrameSink`, or None when the server offers none."""
    extensions = scope.get("extensions") if isinstance(scope, dict) else None
    sink = extensions.get(FRAMES_EXTENSION) if isinstance(extensions, dict) else None
    return cast(FrameSink, sink) if sink is not None else None


class _ReceiveQueue:
    """What uvicorn's protocol needs of its `asyncio.Queue` (put_nowait, get, empty) without its three
    deques and its Event (~3 KiB per connection): a list and a future made only while the app waits."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


class _Flag:
    """`asyncio.Event`'s set/clear/is_set/wait without its deque: a future only while someone waits."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        while not self._set:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        return True


class MercatoWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `websockets` sans-I/O protocol plus the `mercato.ws.frames` scope extension, and
    lighter per-connection state (the idle connection's memory, ADR 0063)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = cast(Any, _ReceiveQueue())
        self.writable = cast(Any, _Flag())

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is None:
            return
        # Raw frames only without extensions: permessage-deflate rewrites every frame.
        if not self.conn.extensions:
            scope["extensions"][FRAMES_EXTENSION] = self  # type: ignore[index]
        self._restart_parser()

    def _restart_parser(self) -> None:
        """`ServerProtocol.parse` keeps the handshake's `Request` (every header, ~3 KiB) in its frame
        for the connection's lifetime. Once the request is parsed, the frame parser it delegates to
        is started afresh, when it is provably at its start (waiting in `at_eof`: nothing consumed)."""
        conn = self.conn
        inner = getattr(conn.parser, "gi_yieldfrom", None)
        waiting = getattr(inner, "gi_yieldfrom", None)
        if (
            inner is None
            or getattr(inner, "gi_code", None) is not _FRAME_PARSE
            or getattr(waiting, "gi_code", None) is not _AT_EOF
        ):
            return
        parser = _FRAME_PARSER(conn)
        next(parser)
        conn.parser = parser

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "response", None) is not None:
            # Read only to answer the handshake: not kept for the connection's lifetime.
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]

    @property
    def open(self) -> bool:
        return not (self.close_sent or self.disconnected) and self.conn.state is State.OPEN

    def write_frame(self, frame: bytes) -> bool:
        if self.close_sent or self.disconnected or self.conn.state is not State.OPEN:
            return True
        if not self.writable.is_set():
            return False
        self.transport.write(frame)
        return True

    async def wait_writable(self) -> None:
        await self.writable.wait()


_FRAME_PARSER = WebSocketsProtocol.parse
_FRAME_PARSE = WebSocketsProtocol.parse.__code__
_AT_EOF = StreamReader.at_eof.__code__
