"""Reading a request's body ahead of the app, and handing it to the app as if unread.

A layer that must see the body before the route does (the idempotency fingerprint, a simulated
provider's fault decision) reads it whole, then gives the app a `receive` that yields it once.
"""

from __future__ import annotations

from starlette.types import Message, Receive

__all__ = ["read_body", "replaying"]


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body, and False when the client left (`http.disconnect`) before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), False
        chunks.append(bytes(message.get("body", b"")))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def replaying(body: bytes, receive: Receive, *, more_body: bool = False) -> Receive:
    """`receive` for an app whose body was already read: the body once, then the real stream (so a
    later disconnect still reaches the app). `more_body=True` when the client left mid-body: the app
    sees what arrived as unfinished, then the disconnect."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": more_body}

    return replay
