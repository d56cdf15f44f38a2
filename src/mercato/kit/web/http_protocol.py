"""uvicorn's httptools HTTP/1.1 protocol, with a response's head and first body part in one write.

uvicorn writes a response in two `transport.write` calls: the status line and headers, then the
body. On an idle socket each is its own `send` system call, and on this kind of VM a `send` costs
~8-10 µs of CPU: for a response answered from memory (a cached product, ~150 µs in all) the second
call is ~6 % of the request (py-spy, docs/benchmarks.md "Session 9 (lead)"). `MercatoHttpProtocol`
(`mercato api` and `mercato up` pass it as uvicorn's `http` protocol class, a documented setting)
gives each request-response cycle a `CoalescingWriter` in front of the socket: the head is held
until the first body part follows and both leave in one write.

A head whose body does not follow at once (a stream, an SSE response, a slow handler between
`http.response.start` and its body) must not wait for it: the held head is also flushed at the end
of the event loop's current iteration (`call_soon`), which is before the loop waits for anything.
Only the first write of a cycle is held; every later write goes straight through, so flow control
(the transport's pause/resume callbacks to the protocol) is the transport's own, unchanged.
The WebSocket upgrade never sees the writer: uvicorn hands its protocol the connection's transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingWriter", "MercatoHttpProtocol"]


class CoalescingWriter:
    """One response's way to the socket: the first write waits for the second, or for the end of
    the loop iteration, whichever comes first; then it is the transport itself."""

    __slots__ = ("_flush_handle", "_held", "_loop", "_passthrough", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._passthrough = False

    def write(self, data: bytes) -> None:
        if self._passthrough:
            self.transport.write(data)
        elif self._held is None:
            self._held = data
            self._flush_handle = self._loop.call_soon(self.flush)
        else:
            held, self._held = self._held, None
            self._passthrough = True
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self.transport.write(held + data)

    def flush(self) -> None:
        """Write what is held, if anything; from here on every write goes straight through."""
        self._passthrough = True
        held, self._held = self._held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # Anything else the cycle asks of its transport (none today) is the transport's.
        return getattr(self.transport, name)


class MercatoHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose request-response cycles write through a `CoalescingWriter`."""

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        # A new cycle was made (not an upgrade): its task has not run yet, so no write has happened.
        if cycle is not None and cycle is not previous:
            cycle.transport = CoalescingWriter(self.transport, self.loop)  # type: ignore[assignment]
