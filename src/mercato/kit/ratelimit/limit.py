"""The values every limiter speaks: a `Limit` (the policy) and a `Decision` (the answer).

A `Decision` carries exactly what the IETF RateLimit header fields and the older `X-RateLimit-*` /
`Retry-After` headers need, so HTTP middleware builds its headers from it and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Decision", "Limit"]


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` units per `period_s` seconds, with room for a burst of `burst` units.

    - Token bucket: capacity = `burst`, refilled at `rate / period_s` tokens per second.
    - Leaky bucket (GCRA): one unit drains every `T = period_s / rate` seconds; up to `burst` units may be
      outstanding (tolerance `tau = burst * T`).
    - Fixed window, sliding window counter, sliding log: at most `rate` units per `period_s`; `burst` is not
      used, because a window already is its own burst allowance.

    `burst` defaults to `rate` (e.g. `Limit(rate=100, period_s=1, burst=200)` is "100/s, bursts of 200").
    """

    rate: int
    period_s: float = 1.0
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.rate < 1:
            raise ValueError(f"rate must be >= 1, got {self.rate}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"period_s must be a positive finite number, got {self.period_s}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")

    @property
    def capacity(self) -> int:
        """The bucket size: `burst`, or `rate` when no burst was given."""
        return self.rate if self.burst is None else self.burst

    @property
    def per_second(self) -> float:
        """Sustained rate in units per second: `rate / period_s`."""
        return self.rate / self.period_s

    @property
    def emission_interval_s(self) -> float:
        """Seconds between two units at the sustained rate: `T = period_s / rate`."""
        return self.period_s / self.rate

    def __str__(self) -> str:
        burst = "" if self.burst is None else f" burst {self.burst}"
        return f"{self.rate}/{self.period_s:g}s{burst}"


class Decision(NamedTuple):
    """The answer to one `hit` (or `peek`).

    - `allowed`: admit the request (a 429 otherwise).
    - `limit`: the quota the headers advertise (bucket capacity, or units per window).
    - `remaining`: whole units still available right after this decision.
    - `reset_after_s`: seconds until the quota is fully restored if nothing else arrives.
    - `retry_after_s`: seconds until the same request would be admitted; 0 when allowed.
    - `degraded`: the backend could not be asked; the answer came from the fail-open/closed policy.

    A tuple rather than a frozen dataclass: one is built for every request the edge sees, and a tuple is
    built in about half the time (0.39 against 0.70 µs here).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after_s: float
    retry_after_s: float
    degraded: bool = False

    def headers(self) -> dict[str, str]:
        """RateLimit-* (IETF draft), X-RateLimit-* and, when refused, Retry-After.

        Seconds are rounded up (`ceil`), so a client that waits what it is told is never refused for
        having come back a fraction of a second early. Reset is a delta in seconds in both families.
        """
        return {name.decode("latin-1"): value.decode("latin-1") for name, value in self._pairs(_TITLE_NAMES)}

    def header_pairs(self) -> list[tuple[bytes, bytes]]:
        """The same fields as `headers`, as the lower-case byte pairs an ASGI response carries."""
        return self._pairs(_ASGI_NAMES)

    def _pairs(self, names: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
        limit = b"%d" % self.limit
        remaining = b"%d" % self.remaining
        reset = b"%d" % math.ceil(self.reset_after_s)
        pairs = [
            (names[0], limit),
            (names[1], remaining),
            (names[2], reset),
            (names[3], limit),
            (names[4], remaining),
            (names[5], reset),
        ]
        if not self.allowed:
            pairs.append((names[6], b"%d" % max(1, math.ceil(self.retry_after_s))))
        return pairs


_TITLE_NAMES = (
    b"RateLimit-Limit",
    b"RateLimit-Remaining",
    b"RateLimit-Reset",
    b"X-RateLimit-Limit",
    b"X-RateLimit-Remaining",
    b"X-RateLimit-Reset",
    b"Retry-After",
)
_ASGI_NAMES = tuple(name.lower() for name in _TITLE_NAMES)
