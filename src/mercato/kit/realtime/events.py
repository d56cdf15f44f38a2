"""What flows through the real-time layer: one event on one channel, and its wire form.

A channel is a string such as `room:<id>` or `order:<id>`. Essential events carry `seq`, the
channel's durable sequence number (1, 2, 3, ... with no gap): a client that saw seq N resumes
from N and loses nothing, because the sequenced events also live in a history the `History` port
reads. Non-essential events (typing, presence) have `seq == 0`, are never stored, and are the first
thing dropped when a connection falls behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from mercato.kit.realtime.framing import text_frame

__all__ = ["ChannelEvent", "History"]


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """One event on `channel`. `reply_to` names the connection (`node/conn`) that caused it and
    should get an acknowledgement (`ack`, a dict merged into the ack frame) even when it already
    saw this seq: a re-sent chat message is acknowledged again with its first seq."""

    channel: str
    type: str
    data: dict[str, Any]
    seq: int = 0
    essential: bool = True
    origin: str = ""
    reply_to: str = ""
    ack: dict[str, Any] = field(default_factory=dict)
    # Wall-clock seconds when the event became durable (persisted), for the fan-out latency metric.
    at: float = 0.0
    # True: `origin`'s hub fanned it out to its own connections before publishing it (ADR 0085), so
    # that hub skips it when the broker brings it back; every other hub fans it out as usual.
    fanned_out_at_origin: bool = False
    # The client frame's JSON text, encoded on first use: once per fan-out, not once per connection.
    _wire: str | None = field(default=None, init=False, compare=False, repr=False)
    # The same as one WebSocket text frame, framed once for every connection's socket (ADR 0063).
    _frame: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def to_bytes(self) -> bytes:
        raw: dict[str, Any] = {
            "c": self.channel,
            "t": self.type,
            "d": self.data,
            "s": self.seq,
            "e": self.essential,
            "o": self.origin,
            "r": self.reply_to,
            "a": self.ack,
            "at": self.at,
        }
        if self.fanned_out_at_origin:
            raw["f"] = True
        return orjson.dumps(raw)

    @classmethod
    def from_bytes(cls, payload: bytes | str) -> ChannelEvent:
        raw = orjson.loads(payload)
        return cls(
            channel=str(raw["c"]),
            type=str(raw["t"]),
            data=dict(raw.get("d") or {}),
            seq=int(raw.get("s") or 0),
            essential=bool(raw.get("e", True)),
            origin=str(raw.get("o") or ""),
            reply_to=str(raw.get("r") or ""),
            ack=dict(raw.get("a") or {}),
            at=float(raw.get("at") or 0.0),
            fanned_out_at_origin=bool(raw.get("f", False)),
        )

    def wire(self) -> str:
        """`frame()` as JSON text; every connection an event fans out to shares this one string."""
        if self._wire is None:
            object.__setattr__(self, "_wire", orjson.dumps(self.frame()).decode())
        assert self._wire is not None
        return self._wire

    def ws_frame(self) -> bytes:
        """`wire()` as one server WebSocket text frame, shared by every connection it is written to."""
        if self._frame is None:
            object.__setattr__(self, "_frame", text_frame(self.wire().encode()))
        assert self._frame is not None
        return self._frame

    def frame(self) -> dict[str, Any]:
        """The client-facing JSON frame: the event's data with its type, channel and seq."""
        out: dict[str, Any] = {"type": self.type, "channel": self.channel}
        if self.seq:
            out["seq"] = self.seq
        out.update(self.data)
        return out


class History(Protocol):
    """The durable side of sequenced channels: what a resuming client missed."""

    async def head(self, channel: str) -> int:
        """The channel's last seq (0 when empty)."""
        ...

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        """Up to `limit` events with seq > `seq`, in seq order."""
        ...
