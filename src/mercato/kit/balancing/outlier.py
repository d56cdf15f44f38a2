"""Passive outlier detection: a host that fails in a row is ejected for a growing period (ADR 0039).

Learnt from Envoy's outlier detection, defaults and all, and from what its users tripped on:

- `consecutive_5xx` (Envoy: 5) server errors in a row, or `consecutive_local_failures` (5) timeouts
  or refused/reset connections in a row (Envoy's locally-originated errors), eject the host. Any
  success resets both counters.
- The ejection lasts `base_ejection_s × n` (Envoy: 30 s × n), `n` the number of times the host has
  been ejected, capped at `max_ejection_s` (Envoy: 300 s). `n` shrinks by one for each
  `base_ejection_s` the host spends back in service without being ejected again (Envoy decrements
  per interval), so a host that recovered for good returns to short ejections.
- At most `max_ejection_percent` of the hosts are ejected at once, counted *after* the ejection
  under consideration: with 3 hosts and 50 %, one host may be ejected, never two (Envoy before
  1.27 counted before, and ejected 2 of 3 at 50 % — issues #26877, #27066). No host is ejected "regardless
  of the percentage" unless `always_eject_one` is set: Envoy ejected one host whatever the
  percentage (#3263), including the only host of a one-host cluster (#17504); it made that opt-in in
  1.31 (`always_eject_one_host`). Our default percentage is 50, not Envoy's 10: with 10 % of 3
  providers nothing could ever be ejected, and 3 is our usual count.
- A host over the cap stays in service and its failure is counted as an `overflow` (Envoy's
  `ejections_overflow`), so an operator sees the cap held something back.

Time is injectable (`clock`), so the rules are tested without sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

__all__ = ["EjectionHooks", "Outcome", "OutlierDetector", "OutlierSettings"]


class Outcome(Enum):
    SUCCESS = "success"
    SERVER_ERROR = "server_error"  # the host answered 5xx
    LOCAL_FAILURE = "local_failure"  # timeout, refused, reset: no answer


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_5xx: int = 5
    consecutive_local_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 50.0
    always_eject_one: bool = False

    def __post_init__(self) -> None:
        if self.consecutive_5xx < 1 or self.consecutive_local_failures < 1:
            raise ValueError("consecutive thresholds must be >= 1")
        if self.base_ejection_s <= 0 or self.max_ejection_s < self.base_ejection_s:
            raise ValueError("need 0 < base_ejection_s <= max_ejection_s")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be within 0..100")

    def max_ejected(self, hosts: int) -> int:
        """How many of `hosts` may be ejected at once: floor(percent × hosts / 100); at least one
        with `always_eject_one` (even the only host, as Envoy did: then calls go to it anyway)."""
        cap = math.floor(self.max_ejection_percent * hosts / 100 + 1e-9)
        if self.always_eject_one and hosts > 0:
            cap = max(cap, 1)
        return min(cap, hosts)


class EjectionHooks(Protocol):
    def on_ejected(self, host: str, *, duration_s: float, times: int) -> None: ...
    def on_returned(self, host: str) -> None: ...
    def on_overflow(self, host: str) -> None: ...


@dataclass(slots=True)
class _HostState:
    consecutive_5xx: int = 0
    consecutive_local: int = 0
    times_ejected: int = 0
    ejected_until: float | None = None
    back_since: float | None = None


class OutlierDetector:
    """Per-host failure streaks and ejections for a fixed set of hosts."""

    def __init__(
        self,
        hosts: Sequence[str],
        settings: OutlierSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        hooks: Sequence[EjectionHooks] = (),
    ) -> None:
        if len(set(hosts)) != len(hosts):
            raise ValueError("hosts must be unique")
        self.settings = settings or OutlierSettings()
        self._clock = clock
        self._hooks = list(hooks)
        self._hosts = {h: _HostState() for h in hosts}
        self.overflows = 0

    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    def _refresh(self, now: float) -> None:
        """Return hosts whose ejection has ended; decay the ejection multiplier of hosts back in
        service (one step per `base_ejection_s` spent healthy)."""
        base = self.settings.base_ejection_s
        for host, state in self._hosts.items():
            if state.ejected_until is not None and now >= state.ejected_until:
                state.back_since = state.ejected_until  # the decay counts from the ejection's end
                state.ejected_until = None
                state.consecutive_5xx = state.consecutive_local = 0
                for hook in self._hooks:
                    hook.on_returned(host)
            if state.ejected_until is None and state.back_since is not None and state.times_ejected > 0:
                steps = int((now - state.back_since) // base)
                if steps > 0:
                    state.times_ejected = max(0, state.times_ejected - steps)
                    state.back_since += steps * base

    def is_ejected(self, host: str) -> bool:
        self._refresh(self._clock())
        return self._hosts[host].ejected_until is not None

    def ejected(self) -> list[str]:
        self._refresh(self._clock())
        return [h for h, s in self._hosts.items() if s.ejected_until is not None]

    def available(self) -> list[str]:
        """Hosts in service now (never empty while the cap is below 100 %)."""
        self._refresh(self._clock())
        return [h for h, s in self._hosts.items() if s.ejected_until is None]

    def times_ejected(self, host: str) -> int:
        self._refresh(self._clock())
        return self._hosts[host].times_ejected

    def ejected_until(self, host: str) -> float | None:
        self._refresh(self._clock())
        return self._hosts[host].ejected_until

    def record(self, host: str, outcome: Outcome) -> bool:
        """Count one call's outcome; True if it ejected `host`."""
        now = self._clock()
        self._refresh(now)
        state = self._hosts[host]
        if outcome is Outcome.SUCCESS:
            state.consecutive_5xx = state.consecutive_local = 0
            return False
        if outcome is Outcome.SERVER_ERROR:
            state.consecutive_5xx += 1
        else:
            state.consecutive_local += 1
        if state.ejected_until is not None:
            return False  # already out (a call that was in flight when it was ejected)
        s = self.settings
        if (
            state.consecutive_5xx < s.consecutive_5xx
            and state.consecutive_local < s.consecutive_local_failures
        ):
            return False
        ejected_now = sum(1 for st in self._hosts.values() if st.ejected_until is not None)
        if ejected_now + 1 > s.max_ejected(len(self._hosts)):
            self.overflows += 1
            for hook in self._hooks:
                hook.on_overflow(host)
            return False
        state.times_ejected += 1
        duration = min(s.base_ejection_s * state.times_ejected, s.max_ejection_s)
        state.ejected_until = now + duration
        state.back_since = None
        state.consecutive_5xx = state.consecutive_local = 0
        for hook in self._hooks:
            hook.on_ejected(host, duration_s=duration, times=state.times_ejected)
        return True
