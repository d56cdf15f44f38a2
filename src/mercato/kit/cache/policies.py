"""Byte-bounded in-process stores: plain LRU, and W-TinyLFU (admission by estimated frequency).

LRU admits everything, so one scan of cold keys (a crawler, a report) flushes the hot set. TinyLFU
(Einziger, Friedman & Manes 2017) keeps a small count-min sketch of recent access frequencies and
admits a newcomer into the main area only if it is accessed more often than the entries it would
evict; a 1 % LRU window in front lets new-but-bursty keys build up a count first. The sketch is
halved every `sample` increments, so frequencies age. `mercato lab cache-policy` measures both
(and LFU) under Zipf traffic; docs/decisions/0035 records the choice.

Both are bounded by the bytes of their values (what memory actually costs), not by entry count.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

__all__ = ["ByteStore", "CountMinSketch", "LruStore", "TinyLfuStore"]


class ByteStore(Protocol):
    """A bounded map of key → (value, size); `put` returns how many entries it evicted."""

    max_bytes: int

    def get(self, key: str) -> object | None: ...

    def put(self, key: str, value: object, size: int) -> int: ...

    def delete(self, key: str) -> None: ...

    def clear(self) -> None: ...

    @property
    def nbytes(self) -> int: ...

    def __len__(self) -> int: ...


class _Lru:
    """An LRU segment; the building block of both stores."""

    __slots__ = ("items", "nbytes")

    def __init__(self) -> None:
        self.items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.nbytes = 0

    def get(self, key: str) -> object | None:
        item = self.items.get(key)
        if item is None:
            return None
        self.items.move_to_end(key)
        return item[0]

    def add(self, key: str, value: object, size: int) -> None:
        self.remove(key)
        self.items[key] = (value, size)
        self.nbytes += size

    def remove(self, key: str) -> bool:
        old = self.items.pop(key, None)
        if old is None:
            return False
        self.nbytes -= old[1]
        return True

    def pop_oldest(self) -> tuple[str, object, int]:
        key, (value, size) = self.items.popitem(last=False)
        self.nbytes -= size
        return key, value, size


class LruStore:
    def __init__(self, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._lru = _Lru()

    def get(self, key: str) -> object | None:
        return self._lru.get(key)

    def put(self, key: str, value: object, size: int) -> int:
        if size > self.max_bytes:
            self._lru.remove(key)
            return 0
        self._lru.add(key, value, size)
        evicted = 0
        while self._lru.nbytes > self.max_bytes:
            self._lru.pop_oldest()
            evicted += 1
        return evicted

    def delete(self, key: str) -> None:
        self._lru.remove(key)

    def clear(self) -> None:
        self._lru = _Lru()

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru.items)


class CountMinSketch:
    """Four rows of small counters; `estimate` is the minimum over rows (never under the truth
    until a halving). Counters saturate at 15, as 4-bit counters would; every `sample` increments
    all counters are halved (the "reset" that lets old popularity fade)."""

    _DEPTH = 4

    def __init__(self, *, width: int, sample: int) -> None:
        self._width = max(16, width)
        self._rows = [[0] * self._width for _ in range(self._DEPTH)]
        self._sample = max(1, sample)
        self._additions = 0

    def _indexes(self, key: str) -> list[int]:
        # Double hashing (Kirsch & Mitzenmacher): row i uses h1 + i * h2, from one hash() call.
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
        width = self._width
        return [(h1 + i * h2) % width for i in range(self._DEPTH)]

    def add(self, key: str) -> None:
        # `_indexes` unrolled: this runs on every cache lookup (TinyLfuStore.get).
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
        width = self._width
        index = h1
        for row in self._rows:
            slot = index % width
            if row[slot] < 15:
                row[slot] += 1
            index += h2
        self._additions += 1
        if self._additions >= self._sample:
            self._additions //= 2
            for row in self._rows:
                row[:] = [count >> 1 for count in row]

    def estimate(self, key: str) -> int:
        return min(row[index] for row, index in zip(self._rows, self._indexes(key), strict=True))


class TinyLfuStore:
    """W-TinyLFU: a 1 % LRU window, then admission by the sketch into a main LRU.

    `expected_entries` sizes the sketch (width ≈ that, sample = 10×): a guess from max_bytes and a
    typical value size is enough; it only tunes how fast frequencies age.
    """

    def __init__(self, *, max_bytes: int, expected_entries: int = 10_000, window: float = 0.01) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._window_bytes = max(1, int(max_bytes * window))
        self._window = _Lru()
        self._main = _Lru()
        self._sketch = CountMinSketch(width=expected_entries, sample=10 * expected_entries)

    def get(self, key: str) -> object | None:
        self._sketch.add(key)
        value = self._window.get(key)
        if value is None:
            value = self._main.get(key)
        return value

    def put(self, key: str, value: object, size: int) -> int:
        self.delete(key)
        if size > self.max_bytes:
            return 0
        self._window.add(key, value, size)
        evicted = 0
        while self._window.nbytes > self._window_bytes and len(self._window.items) > 1:
            evicted += self._admit(*self._window.pop_oldest())
        return evicted

    def _admit(self, key: str, value: object, size: int) -> int:
        """Move a window leftover into main if it beats the victims it would displace."""
        room = self.max_bytes - self._window_bytes
        victims: list[str] = []
        freed = 0
        for victim, (_, victim_size) in self._main.items.items():
            if self._main.nbytes - freed + size <= room:
                break
            victims.append(victim)
            freed += victim_size
        if self._main.nbytes - freed + size > room:
            return 1  # larger than the whole main area: dropped
        candidate = self._sketch.estimate(key)
        if victims and candidate <= max(self._sketch.estimate(v) for v in victims):
            return 1  # the newcomer is rarer than what it would evict: not admitted
        for victim in victims:
            self._main.remove(victim)
        self._main.add(key, value, size)
        return len(victims)

    def delete(self, key: str) -> None:
        if not self._window.remove(key):
            self._main.remove(key)

    def clear(self) -> None:
        self._window = _Lru()
        self._main = _Lru()

    @property
    def nbytes(self) -> int:
        return self._window.nbytes + self._main.nbytes

    def __len__(self) -> int:
        return len(self._window.items) + len(self._main.items)
