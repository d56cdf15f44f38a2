"""One cached value and its timing facts, as the bytes every tier stores.

An entry is fresh until `fresh_until`, servable-stale until `stale_until` (stale-while-revalidate
and stale-if-error windows), and remembers `delta_s`, how long its load took: XFetch (Vattani et
al. 2015) recomputes early with a probability that grows as expiry nears, scaled by that cost.
A negative entry (`value is None`) records "the origin said: not found" for a short TTL.

Times are wall-clock UNIX seconds, because an entry written by one process is read by another.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["Entry", "Fence"]

# A tier's write fence: captured before a load, checked when storing its result (see tiers.py).
Fence = tuple[int, int]

_HEADER = struct.Struct("!dddB")
_NEGATIVE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes | None
    fresh_until: float
    stale_until: float
    delta_s: float

    @property
    def negative(self) -> bool:
        return self.value is None

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def servable(self, now: float) -> bool:
        return now < self.stale_until

    @property
    def size(self) -> int:
        """Bytes this entry costs a byte-bounded tier (header included)."""
        return _HEADER.size + (len(self.value) if self.value is not None else 0)

    def encode(self) -> bytes:
        flags = _NEGATIVE if self.value is None else 0
        header = _HEADER.pack(self.fresh_until, self.stale_until, self.delta_s, flags)
        return header + (self.value or b"")

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        fresh_until, stale_until, delta_s, flags = _HEADER.unpack_from(raw)
        value = None if flags & _NEGATIVE else bytes(raw[_HEADER.size :])
        return cls(value, fresh_until, stale_until, delta_s)
