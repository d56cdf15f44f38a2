"""Request deadlines: one absolute instant per request, carried in a contextvar and sent downstream.

A deadline is absolute (a point on a `Clock`'s monotonic scale), not a duration, so every layer that
reads it sees the time *left*, however much earlier layers already spent. Nested scopes take the
tighter deadline: an inner call may shorten the budget, never extend it.

On the wire it travels as `X-Request-Deadline: <remaining milliseconds>` (API-CONVENTIONS). Remaining
time rather than a wall-clock instant, so the receiver needs no clock agreement with the sender; the
value is rounded down so a downstream service never believes it has more time than its caller will wait.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.resilience.errors import DeadlineExceeded

__all__ = [
    "DEADLINE_HEADER",
    "Deadline",
    "current_deadline",
    "deadline_scope",
    "outgoing_deadline_headers",
    "parse_deadline_header",
]

DEADLINE_HEADER = "X-Request-Deadline"
_SYSTEM_CLOCK = SystemClock()
_current: ContextVar[Deadline | None] = ContextVar("mercato_request_deadline", default=None)


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute instant `at_s` on `clock.monotonic()`."""

    at_s: float
    clock: Clock

    @classmethod
    def after(cls, timeout_s: float, *, clock: Clock = _SYSTEM_CLOCK) -> Deadline:
        """The deadline `timeout_s` from now: `at_s = clock.monotonic() + max(0, timeout_s)`."""
        return cls(clock.monotonic() + max(0.0, timeout_s), clock)

    def remaining_s(self) -> float:
        """`max(0, at_s - now)`: never negative, so it can be passed straight to a timeout."""
        return max(0.0, self.at_s - self.clock.monotonic())

    @property
    def expired(self) -> bool:
        return self.clock.monotonic() >= self.at_s

    def tighter(self, other: Deadline | None) -> Deadline:
        """The earlier of the two (comparing remaining time, which works across clocks)."""
        if other is None or self.remaining_s() <= other.remaining_s():
            return self
        return other

    def check(self, *, dependency: str = "") -> None:
        """Raise `DeadlineExceeded` if the deadline has passed."""
        if self.expired:
            raise DeadlineExceeded("the request deadline has passed", dependency=dependency)

    def to_header(self) -> str:
        """Remaining whole milliseconds, rounded down."""
        return str(math.floor(self.remaining_s() * 1000.0))


def current_deadline() -> Deadline | None:
    """The deadline of the work in progress, or None when nothing set one."""
    return _current.get()


@contextmanager
def deadline_scope(
    *, timeout_s: float | None = None, deadline: Deadline | None = None, clock: Clock = _SYSTEM_CLOCK
) -> Iterator[Deadline | None]:
    """Run the block under the tighter of the inherited deadline and the one given.

    `timeout_s` builds `Deadline.after(timeout_s, clock=clock)`; `deadline` is used as is; with
    neither, the inherited deadline (possibly None) stays in force. Yields the effective deadline.
    """
    effective = _current.get()
    for candidate in (deadline, Deadline.after(timeout_s, clock=clock) if timeout_s is not None else None):
        if candidate is not None:
            effective = candidate.tighter(effective)
    token = _current.set(effective)
    try:
        yield effective
    finally:
        _current.reset(token)


def parse_deadline_header(
    value: str | None, *, max_timeout_s: float | None = None, clock: Clock = _SYSTEM_CLOCK
) -> Deadline | None:
    """Read an incoming `X-Request-Deadline`.

    Malformed values are ignored (None) rather than rejected: the header is advisory and a bad one
    must not fail a request. Negative values mean "already late" (0 ms). `max_timeout_s` caps what a
    caller may ask for, so a client cannot pin our resources with an hour-long deadline.
    """
    if value is None:
        return None
    text = value.strip()
    if not text.lstrip("-").isdigit() or len(text) > 15:
        return None
    remaining_s = max(0, int(text)) / 1000.0
    if max_timeout_s is not None:
        remaining_s = min(remaining_s, max_timeout_s)
    return Deadline.after(remaining_s, clock=clock)


def outgoing_deadline_headers(deadline: Deadline | None = None) -> Mapping[str, str]:
    """`{X-Request-Deadline: ms}` for an outgoing call, from `deadline` or the current one; {} when none."""
    effective = deadline if deadline is not None else _current.get()
    if effective is None:
        return {}
    return {DEADLINE_HEADER: effective.to_header()}
