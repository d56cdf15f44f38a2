"""Server-Sent Events over a hub connection (ADR 0029: sse-starlette for the wire, ours for the rest).

`channel_events` subscribes a connection to one channel from `Last-Event-ID` and yields each event
as an SSE message (`id:` the seq, `event:` the type), ending after an event `is_last` accepts or when
the queue refuses an essential event (the client reconnects with its Last-Event-ID). The heartbeat
comment every N seconds is sse-starlette's `ping`. A subscription that finds no history read slot in
time (a subscribe storm, ADR 0078) gets one `try_again` event with a `retry:` of its back-off and
ends: the browser reconnects with its Last-Event-ID and loses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent

from mercato.kit.realtime.admission import HistoryBusy
from mercato.kit.realtime.hub import Hub

__all__ = ["channel_event_response", "parse_last_event_id"]


def parse_last_event_id(value: str | None) -> int | None:
    """The seq a client resumes after; None when absent or not a seq (start from the beginning)."""
    if value is None or not value.strip().isdigit() or len(value.strip()) > 18:
        return None
    return int(value.strip())


def channel_event_response(
    hub: Hub,
    *,
    user: str,
    channel: str,
    since: int,
    is_last: Callable[[dict[str, Any]], bool],
    heartbeat_s: float,
) -> EventSourceResponse:
    async def events() -> AsyncIterator[ServerSentEvent]:
        refused = asyncio.Event()
        conn = hub.connect(user, kind="sse", on_refused=refused.set)
        try:
            try:
                await hub.subscribe(conn, channel, since=since)
            except HistoryBusy as busy:
                retry_ms = int(busy.retry_after_s * 1000)
                yield ServerSentEvent(data='{"type":"try_again"}', event="try_again", retry=retry_ms)
                return
            while not refused.is_set():
                frame, _at = await conn.queue.get()
                body = orjson.loads(frame)
                yield ServerSentEvent(
                    data=frame if isinstance(frame, str) else frame.decode(),
                    event=str(body.get("type", "message")),
                    id=str(body["seq"]) if "seq" in body else None,
                )
                if is_last(body):
                    return
        finally:
            await hub.disconnect(conn)

    return EventSourceResponse(
        events(),
        ping=heartbeat_s,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        send_timeout=30,
    )
