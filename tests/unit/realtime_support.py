"""What the hub's unit suites share: a broker that publishes nowhere, a history of `room:a` holding
seqs 1..n, and the frames a connection has queued."""

from __future__ import annotations

import orjson

from mercato.kit.realtime import ChannelEvent, Connection


class NoBroker:
    async def publish(self, event: ChannelEvent) -> None:
        pass


class SeqHistory:
    """A history of `room:a` holding seqs 1..n."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def head(self, channel: str) -> int:
        return self.n

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        return [
            ChannelEvent(channel, "message", {"n": s}, seq=s)
            for s in range(seq + 1, min(self.n, seq + limit) + 1)
        ]


async def queued_frames(conn: Connection) -> list[dict[str, object]]:
    """Take every frame CONN has queued, decoded."""
    out = []
    while len(conn.queue):
        frame, _ = await conn.queue.get()
        out.append(orjson.loads(frame))
    return out
