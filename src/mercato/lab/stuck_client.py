"""A WebSocket client that can really stop reading, for `mercato lab slow-consumer` and its test."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import orjson
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["STUCK_RCVBUF", "StuckClient"]

STUCK_RCVBUF = 4096


class StuckClient:
    """A WebSocket client that can really stop reading: the `websockets` sans-I/O protocol over a raw
    socket with a 4 KiB receive buffer (the asyncio client of `websockets` 17 kept reading its socket into
    memory whatever `max_queue` said: 400 MB in 4 s without a `recv`, so it never pushed back).
    Between calls to `recv` nothing reads the socket, and TCP's window closes on the server."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self.closed = False
        self.close_code: int | None = None

    @classmethod
    async def open(cls, ws_url: str, token: str) -> StuckClient:
        loop = asyncio.get_running_loop()
        uri = parse_uri(ws_url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STUCK_RCVBUF)
        sock.setblocking(False)
        await loop.sock_connect(sock, (uri.host, uri.port))
        protocol = ClientProtocol(uri, max_size=None)
        request = protocol.connect()
        request.headers["Authorization"] = f"Bearer {token}"
        protocol.send_request(request)
        client = cls(sock, protocol)
        await client._flush()
        while protocol.state is State.CONNECTING and protocol.handshake_exc is None:
            await client._pump()
        if protocol.state is not State.OPEN:
            raise ConnectionError(f"handshake failed: {protocol.handshake_exc}")
        return client

    async def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                await asyncio.get_running_loop().sock_sendall(self.sock, chunk)

    async def _pump(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            with contextlib.suppress(EOFError):
                self.protocol.receive_eof()
            raise EOFError("the server closed the connection")
        self.protocol.receive_data(data)
        await self._flush()  # pongs, close frames

    async def send(self, frame: dict[str, Any]) -> None:
        self.protocol.send_text(orjson.dumps(frame))
        await self._flush()

    async def recv(self, timeout_s: float) -> list[dict[str, Any]]:
        """Read until at least one text frame arrives (or `timeout_s`): the frames, [] on timeout.
        Raises EOFError once the server closed the connection (`close_code`: its code, if any)."""
        deadline = time.monotonic() + timeout_s
        while True:
            frames = [
                orjson.loads(event.data)
                for event in self.protocol.events_received()
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT
            ]
            if frames:
                return frames
            if self.protocol.state is State.CLOSED or self.protocol.close_rcvd is not None:
                self.closed = True
                self.close_code = self.protocol.close_rcvd.code if self.protocol.close_rcvd else None
                raise EOFError("closed")
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            try:
                await asyncio.wait_for(self._pump(), left)
            except TimeoutError:
                return []
            except (OSError, EOFError) as exc:
                self.closed = True
                rcvd = self.protocol.close_rcvd
                self.close_code = rcvd.code if rcvd is not None else None
                raise EOFError("closed") from exc

    def close(self) -> None:
        self.sock.close()
