"""ADR 0063: the fan-out write below ASGI. A fanned-out event is framed once and the same bytes go to
every connection's socket; a socket over its write-buffer mark gets its frames through the bounded
queue, drained in order, and nothing written directly overtakes what is queued; under uvicorn with
`MercatoWebSocketProtocol` an idle session has no task beyond the ASGI one."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest
from websockets.frames import Frame, Opcode

from mercato.kit.ports import free_port
from mercato.kit.realtime import ChannelEvent, Hub
from mercato.kit.realtime.framing import text_frame
from mercato.kit.realtime.transport import FRAMES_EXTENSION, MercatoWebSocketProtocol


class _History:
    async def head(self, channel: str) -> int:
        return 0

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        return []


class _Broker:
    async def publish(self, event: ChannelEvent) -> None:
        pass

    async def subscribe(self) -> object:
        from mercato.kit.realtime.broker import Subscription

        return Subscription()

    async def unsubscribe(self, subscription: object) -> None:
        pass


class _Sink:
    """A socket: `writable` False is a transport over its high-water mark."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.writable = asyncio.Event()
        self.writable.set()

    @property
    def open(self) -> bool:
        return True

    def write_frame(self, frame: bytes) -> bool:
        if not self.writable.is_set():
            return False
        self.written.append(frame)
        return True

    async def wait_writable(self) -> None:
        await self.writable.wait()

    def seqs(self) -> list[int]:
        return [orjson.loads(_payload(frame))["seq"] for frame in self.written]


def _payload(frame: bytes) -> bytes:
    size = frame[1] & 0x7F
    offset = 2 if size < 126 else 4 if size == 126 else 10
    return frame[offset:]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_text_frame_is_what_the_websockets_library_frames(size: int) -> None:
    payload = b"x" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


async def test_a_fan_out_writes_one_shared_frame_to_every_socket() -> None:
    hub = Hub(_Broker(), _History(), node_id="n1")  # type: ignore[arg-type]
    sinks = [_Sink() for _ in range(3)]
    for index, sink in enumerate(sinks):
        conn = hub.connect(f"u{index}", kind="ws", on_refused=lambda: None)
        conn.attach_sink(sink, lambda: None)
        await hub.subscribe(conn, "room:a", since=None)
    event = ChannelEvent("room:a", "message", {"text": "hi"}, seq=1)
    hub.fan_out(event)
    frames = [sink.written[0] for sink in sinks]
    assert all(frame is frames[0] for frame in frames)  # framed once, one object for every socket
    expected = {"type": "message", "channel": "room:a", "seq": 1, "text": "hi"}
    assert orjson.loads(_payload(frames[0])) == expected
    assert all(len(conn.queue) == 0 for conn in hub.connections.values())


async def test_a_full_socket_is_fed_from_the_queue_in_order_and_nothing_overtakes_it() -> None:
    from mercato.kit.realtime import WebSocketSession

    hub = Hub(_Broker(), _History(), node_id="n1")  # type: ignore[arg-type]
    session = WebSocketSession(
        None,  # type: ignore[arg-type] - the socket is the sink here
        hub,
        authenticate=lambda token: None,  # type: ignore[arg-type,return-value]
        authorize=lambda principal, channel: None,  # type: ignore[arg-type,return-value]
        handlers={},
    )
    sink = _Sink()
    conn = session.conn = hub.connect("u1", kind="ws", on_refused=lambda: None)
    conn.attach_sink(sink, session._queued)
    await hub.subscribe(conn, "room:a", since=None)

    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=1))
    sink.writable.clear()  # the client stopped reading: the transport paused writing
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=2))
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=3))
    assert sink.seqs() == [1]
    assert len(conn.queue) == 2
    drain = session._writer
    assert drain is not None
    assert not drain.done()

    sink.writable.set()  # resume_writing; a new event arrives before the drain task has run
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=4))
    await asyncio.wait_for(drain, 1)
    assert sink.seqs() == [1, 2, 3, 4]
    assert session._writer is drain
    assert drain.done()  # the drain task ended with the queue empty
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=5))
    assert sink.seqs() == [1, 2, 3, 4, 5]
    assert len(conn.queue) == 0


async def test_under_uvicorn_a_session_writes_below_asgi_and_an_idle_one_has_no_writer_task() -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket
    from websockets.asyncio.client import connect

    from mercato.kit.auth import Principal
    from mercato.kit.realtime import WebSocketSession

    hub = Hub(_Broker(), _History(), node_id="n1")  # type: ignore[arg-type]
    sessions: list[WebSocketSession] = []

    def server_tasks() -> int:
        # Not the client's own tasks (the `websockets` client runs in this loop too).
        return sum(
            "/websockets/asyncio/" not in getattr(task.get_coro(), "cr_code", count.__code__).co_filename
            for task in asyncio.all_tasks()
        )

    async def count(session: WebSocketSession, frame: dict[str, object]) -> None:
        assert session.conn is not None
        session.conn.send_frame({"type": "count", "tasks": server_tasks()})

    async def allow(principal: Principal, channel: str) -> bool:
        return True

    async def endpoint(websocket: WebSocket) -> None:
        session = WebSocketSession(
            websocket,
            hub,
            authenticate=lambda token: Principal(token),
            authorize=allow,
            handlers={"count": count},
        )
        sessions.append(session)
        await session.run()

    port = free_port()
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/ws", endpoint)]),
        host="127.0.0.1",
        port=port,
        ws=MercatoWebSocketProtocol,
        ws_per_message_deflate=False,
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn's flag, no event to wait on
            await asyncio.sleep(0.01)
        url, headers = f"ws://127.0.0.1:{port}/ws", {"Authorization": "Bearer u1"}
        clients: list[Any] = []
        for _ in range(3):
            ws = await connect(url, additional_headers=headers, compression=None)
            clients.append(ws)
            assert orjson.loads(await ws.recv())["type"] == "ready"
            await ws.send(orjson.dumps({"type": "subscribe", "channel": "room:a"}).decode())
            assert orjson.loads(await ws.recv())["type"] == "subscribed"
        first = clients[0]
        await first.send('{"type":"count"}')
        with_three = orjson.loads(await first.recv())["tasks"]
        clients.append(await connect(url, additional_headers=headers, compression=None))
        await clients[-1].recv()
        await first.send('{"type":"count"}')
        with_four = orjson.loads(await first.recv())["tasks"]
        assert with_four - with_three <= 1, (with_three, with_four)  # the ASGI task only
        assert all(s.conn is not None and s.conn.sink is not None for s in sessions)
        assert all(FRAMES_EXTENSION in s.websocket.scope["extensions"] for s in sessions)

        hub.fan_out(ChannelEvent("room:a", "message", {"text": "hi"}, seq=1))
        for ws in clients[:3]:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert frame == {"type": "message", "channel": "room:a", "seq": 1, "text": "hi"}
        for ws in clients:
            await ws.close()
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 10)
