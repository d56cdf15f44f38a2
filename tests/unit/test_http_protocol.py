"""kit/web/http_protocol.py: under `MercatoHttpProtocol` a response's head and first body part leave
in one transport write (uvicorn's own protocol makes two); a head whose body comes later is not held
past the loop iteration; a stream's later parts and a closing connection lose nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from mercato.kit.web.http_protocol import MercatoHttpProtocol
from tests.recording_transport import RecordingTransport

_REQUEST = b"GET /thing HTTP/1.1\r\nHost: example.test\r\n\r\n"


async def _constant(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(
    protocol_class: type[HttpToolsProtocol],
    app: Any,
    request: bytes = _REQUEST,
    transport: RecordingTransport | None = None,
) -> RecordingTransport:
    config = uvicorn.Config(app, log_config=None, lifespan="off", server_header=False, date_header=False)
    state = ServerState()
    loop = asyncio.get_running_loop()
    protocol = protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
    transport = transport or RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await asyncio.gather(*state.tasks)
    await asyncio.sleep(0)  # one more iteration: a held write would be flushed by now
    return transport


@pytest.mark.asyncio
async def test_head_and_body_leave_in_one_write() -> None:
    transport = await _serve(MercatoHttpProtocol, _constant)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\nok")


@pytest.mark.asyncio
async def test_uvicorns_own_protocol_writes_twice() -> None:
    # What the class is for: the same response costs uvicorn's protocol two writes (two syscalls).
    transport = await _serve(HttpToolsProtocol, _constant)
    assert len(transport.writes) == 2


@pytest.mark.asyncio
async def test_a_head_whose_body_comes_later_is_written_within_the_iteration() -> None:
    seen_before_body: list[list[bytes]] = []
    transport_ref: list[RecordingTransport] = []

    async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await asyncio.sleep(0.01)  # an SSE stream waiting for its first event
        seen_before_body.append(list(transport_ref[0].writes))
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    transport = RecordingTransport()
    transport_ref.append(transport)
    await _serve(MercatoHttpProtocol, stream, transport=transport)

    # The head went out on its own while the stream waited, before any event.
    assert len(seen_before_body[0]) == 1
    assert seen_before_body[0][0].startswith(b"HTTP/1.1 200 OK")
    body = b"".join(transport.writes[1:])
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"


@pytest.mark.asyncio
async def test_a_connection_close_response_is_written_before_the_close() -> None:
    request = b"GET /thing HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
    transport = await _serve(MercatoHttpProtocol, _constant, request)
    assert transport.closed
    assert b"".join(transport.writes).endswith(b"\r\n\r\nok")


@pytest.mark.asyncio
async def test_pipelined_requests_each_get_their_whole_response() -> None:
    transport = await _serve(MercatoHttpProtocol, _constant, _REQUEST * 3)
    await asyncio.sleep(0.01)
    assert b"".join(transport.writes).count(b"HTTP/1.1 200 OK\r\n") == 3
    assert all(write.endswith(b"ok") for write in transport.writes)
