"""WebSocket framing for frames written below ASGI (ADR 0063; `transport.py`)."""

from __future__ import annotations

__all__ = ["text_frame"]


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked (server to client) WebSocket text frame carrying `payload` (RFC 6455 §5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65_536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload
