"""A circuit breaker that trips on the error rate, the slow-call rate or a run of consecutive failures.

States (guide §1)::

    CLOSED --(calls >= minimum_calls and (failure_rate >= t_f or slow_call_rate >= t_s),
              or consecutive_failures in a row)--> OPEN
    OPEN --(the open wait elapsed; checked lazily on the next acquire/read)--> HALF_OPEN
    HALF_OPEN --(all `half_open_probes` probes done, both rates below their thresholds)--> CLOSED
    HALF_OPEN --(the probes' rates are certain to reach a threshold)--> OPEN, with a longer wait

`failure_rate = failures / calls` and `slow_call_rate = slow / calls` over the last `window_s`, where a
call is slow when its duration >= `slow_call_duration_s` (a slow success still counts as slow: a
dependency that answers in 5 s is as harmful to us as one that errors).

The window is time-bucketed rather than the last N calls: a rate over the last 10 s reflects the
dependency *now* at any traffic level, whereas a count window at low traffic keeps failures from minutes
ago; `minimum_calls` guards the low-traffic case against tripping on two unlucky calls. The rate alone
is slow to notice a dependency that went from healthy to dead: the successes from before the outage
stay in the window until they slide out, and with hangs every call admitted meanwhile pays its whole
timeout. `consecutive_failures` (off by default: the right run length depends on the traffic and the
error rate one tolerates) trips on an unbroken run of failures whatever the window holds.

Half-open admits `half_open_probes` probes (1 by default: one call in flight, the rest refused at once
while it is out) and decides on their rates over `half_open_probes`. It reopens as soon as the probes
already back make a threshold certain (the rest cannot lower a rate), but closes only once every probe
is back: reopening on partial evidence costs one more wait, closing on it lets all traffic in. A probe
still out after `slow_call_duration_s` is counted slow then, on the next read, rather than when its
caller's timeout finally fires: its duration can only grow. What it reports later moves nothing.

Each reopening from half-open multiplies the open wait by `wait_multiplier`, up to `max_wait_s`; every
wait is jittered down by up to `wait_jitter` of itself (so processes that tripped together do not probe
together, and no wait exceeds its nominal value); closing resets it to `wait_s`::

    wait_k = min(max(wait_s, max_wait_s), wait_s * wait_multiplier**k) * (1 - wait_jitter * U[0, 1))

where k is the number of failed half-open rounds since the circuit last closed.

Outcomes of calls admitted before the latest transition are reported to hooks but do not move the state
(each permit carries the epoch it was issued in): a slow call admitted while CLOSED that fails after the
breaker opened must not count as a half-open probe.

Everything is synchronous bookkeeping with no I/O and no awaits, so the rejection path is a clock read,
a comparison and an exception; and no locks are needed under asyncio. Not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from random import Random
from types import TracebackType
from typing import TypedDict, TypeVar

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.resilience.errors import CircuitOpen
from mercato.kit.resilience.hooks import BreakerHooks, BreakerState, Outcome
from mercato.kit.resilience.window import RollingWindow

__all__ = ["BreakerConfig", "BreakerSnapshot", "CircuitBreaker", "Permit"]

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """Breaker thresholds. Rates are fractions in (0, 1]; durations in seconds.

    `consecutive_failures=0` disables the run-of-failures trip; `max_wait_s` at or below `wait_s`
    (or `wait_multiplier=1`) keeps the open wait constant; `wait_jitter=0` makes it exact.
    """

    failure_rate_threshold: float = 0.5
    slow_call_rate_threshold: float = 0.8
    slow_call_duration_s: float = 1.0
    minimum_calls: int = 20
    consecutive_failures: int = 0
    window_s: float = 10.0
    window_buckets: int = 10
    wait_s: float = 5.0
    wait_multiplier: float = 2.0
    max_wait_s: float = 60.0
    wait_jitter: float = 0.2
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        for rate in (self.failure_rate_threshold, self.slow_call_rate_threshold):
            if not 0.0 < rate <= 1.0:
                raise ValueError("rate thresholds must be in (0, 1]")
        if self.minimum_calls < 1 or self.half_open_probes < 1 or self.window_buckets < 1:
            raise ValueError("minimum_calls, half_open_probes and window_buckets must be >= 1")
        if self.slow_call_duration_s <= 0 or self.window_s <= 0 or self.wait_s < 0:
            raise ValueError("slow_call_duration_s and window_s must be > 0, wait_s >= 0")
        if self.consecutive_failures < 0:
            raise ValueError("consecutive_failures must be >= 0 (0: off)")
        if self.wait_multiplier < 1.0 or self.max_wait_s < 0 or not 0.0 <= self.wait_jitter < 1.0:
            raise ValueError("need wait_multiplier >= 1, max_wait_s >= 0 and wait_jitter in [0, 1)")

    @property
    def wait_cap_s(self) -> float:
        """The longest open wait: the cap never shortens the first wait."""
        return max(self.wait_s, self.max_wait_s)


class BreakerSnapshot(TypedDict):
    """A JSON-able view of one breaker, for the admin endpoint."""

    name: str
    state: str
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float
    slow_call_rate: float
    consecutive_failures: int
    opened_at: str | None
    retry_after_s: float | None
    open_wait_s: float | None
    reopenings: int
    half_open_probes_in_flight: int
    rejections: int
    transitions: int
    config: dict[str, float | int]


class Permit:
    """Admission for one call; report its outcome exactly once (later reports are ignored)."""

    __slots__ = ("_breaker", "_done", "epoch", "probe", "started_s")

    def __init__(self, breaker: CircuitBreaker, *, epoch: int, probe: bool, started_s: float) -> None:
        self._breaker = breaker
        self._done = False
        self.epoch = epoch
        self.probe = probe
        self.started_s = started_s

    def record(self, outcome: Outcome, *, duration_s: float | None = None) -> None:
        """Report the outcome; `duration_s` defaults to the time since the permit was issued."""
        if self._done:
            return
        self._done = True
        self._breaker._record(self, outcome, duration_s)

    def success(self, *, duration_s: float | None = None) -> None:
        self.record(Outcome.SUCCESS, duration_s=duration_s)

    def failure(self, *, duration_s: float | None = None) -> None:
        self.record(Outcome.FAILURE, duration_s=duration_s)

    def ignore(self) -> None:
        self.record(Outcome.IGNORED, duration_s=0.0)


def _default_is_failure(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


class CircuitBreaker:
    """One dependency's breaker. `acquire()` + `Permit`, `guard()` or `call()`."""

    def __init__(
        self,
        name: str,
        *,
        config: BreakerConfig | None = None,
        clock: Clock | None = None,
        rng: Random | None = None,
        hooks: Sequence[BreakerHooks] = (),
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or Random()
        self._hooks = tuple(hooks)
        self._window = RollingWindow(
            window_s=self.config.window_s, buckets=self.config.window_buckets, clock=self._clock
        )
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._consecutive_failures = 0
        self._opened_at_s = 0.0
        self._opened_at_wall: str | None = None
        # The un-jittered wait of the next opening, and the jittered one of the current opening.
        self._base_wait_s = self.config.wait_s
        self._open_wait_s = self.config.wait_s
        self._reopenings = 0
        self._probes_admitted = 0
        # Probes whose verdict is still to come, oldest first; only these move the half-open state.
        self._probes_pending: list[Permit] = []
        self._probes_done = 0
        self._probe_failures = 0
        self._probe_slow = 0
        self.rejections = 0
        self.transitions = 0
        for hook in self._hooks:
            hook.on_state_change(name, None, BreakerState.CLOSED)

    @property
    def state(self) -> BreakerState:
        """The current state; moves OPEN to HALF_OPEN once the open wait has passed, and judges a
        half-open probe slow once it has been out `slow_call_duration_s`."""
        if self._state is BreakerState.OPEN:
            if self._clock.monotonic() - self._opened_at_s >= self._open_wait_s:
                self._transition(BreakerState.HALF_OPEN)
        elif self._state is BreakerState.HALF_OPEN and self._probes_pending:
            self._judge_overdue_probes()
        return self._state

    def add_hooks(self, *hooks: BreakerHooks) -> None:
        """Subscribe more hooks (a recorder wired after the breaker was built); they see what follows."""
        self._hooks = (*self._hooks, *hooks)

    @property
    def probes_in_flight(self) -> int:
        """Half-open probes admitted whose verdict is still to come."""
        return len(self._probes_pending) if self._state is BreakerState.HALF_OPEN else 0

    @property
    def open_wait_s(self) -> float:
        """How long the current (or latest) opening lasts, jitter included."""
        return self._open_wait_s

    def retry_after_s(self) -> float:
        """Seconds until an OPEN breaker admits probes; 0 when not OPEN."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at_s + self._open_wait_s - self._clock.monotonic())

    def acquire(self) -> Permit:
        """Admit one call or raise `CircuitOpen`."""
        state = self.state
        now = self._clock.monotonic()
        if state is BreakerState.CLOSED:
            return Permit(self, epoch=self._epoch, probe=False, started_s=now)
        if state is BreakerState.HALF_OPEN and self._probes_admitted < self.config.half_open_probes:
            self._probes_admitted += 1
            permit = Permit(self, epoch=self._epoch, probe=True, started_s=now)
            self._probes_pending.append(permit)
            return permit
        self.rejections += 1
        for hook in self._hooks:
            hook.on_rejected(self.name)
        if state is BreakerState.OPEN:
            retry_after_s = max(0.0, self._opened_at_s + self._open_wait_s - now)
        elif self._probes_pending:
            # By then the oldest probe has been judged (back, or slow), so the state may have moved.
            retry_after_s = max(
                0.0, self._probes_pending[0].started_s + self.config.slow_call_duration_s - now
            )
        else:
            retry_after_s = 0.0  # every probe is judged; the last verdicts are due any moment
        raise CircuitOpen(
            f"circuit for {self.name!r} is {state.value}", dependency=self.name, retry_after_s=retry_after_s
        )

    def guard(self) -> _Guard:
        """`async with breaker.guard():` admits (or raises `CircuitOpen`) and records the block's outcome."""
        return _Guard(self, _default_is_failure)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        is_failure: Callable[[BaseException], bool] = _default_is_failure,
    ) -> T:
        """Await `fn()` under the breaker. Exceptions for which `is_failure` is False count as success."""
        async with _Guard(self, is_failure):
            return await fn()

    def snapshot(self) -> BreakerSnapshot:
        state = self.state
        counts = self._window.counts()
        return {
            "name": self.name,
            "state": state.value,
            "calls": counts.calls,
            "failures": counts.failures,
            "slow_calls": counts.slow_calls,
            "failure_rate": round(counts.failure_rate, 4),
            "slow_call_rate": round(counts.slow_call_rate, 4),
            "consecutive_failures": self._consecutive_failures,
            "opened_at": self._opened_at_wall if state is not BreakerState.CLOSED else None,
            "retry_after_s": round(self.retry_after_s(), 3) if state is BreakerState.OPEN else None,
            "open_wait_s": round(self._open_wait_s, 3) if state is not BreakerState.CLOSED else None,
            "reopenings": self._reopenings,
            "half_open_probes_in_flight": self.probes_in_flight,
            "rejections": self.rejections,
            "transitions": self.transitions,
            "config": asdict(self.config),
        }

    def _record(self, permit: Permit, outcome: Outcome, duration_s: float | None) -> None:
        if duration_s is None:
            duration_s = max(0.0, self._clock.monotonic() - permit.started_s)
        for hook in self._hooks:
            hook.on_call(self.name, outcome, duration_s)
        if permit.epoch != self._epoch:
            return
        failed = outcome is Outcome.FAILURE
        slow = duration_s >= self.config.slow_call_duration_s
        if self._state is BreakerState.CLOSED:
            if outcome is Outcome.IGNORED:
                return
            self._window.record(failure=failed, slow=slow)
            self._consecutive_failures = self._consecutive_failures + 1 if failed else 0
            counts = self._window.counts()
            run = self.config.consecutive_failures
            if (run and self._consecutive_failures >= run) or (
                counts.calls >= self.config.minimum_calls
                and self._over_threshold(counts.failure_rate, counts.slow_call_rate)
            ):
                self._transition(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN and permit in self._probes_pending:
            self._probes_pending.remove(permit)
            if outcome is Outcome.IGNORED:
                self._probes_admitted -= 1  # the slot goes back: it told us nothing
                return
            self._probe_verdict(failed=failed, slow=slow)

    def _judge_overdue_probes(self) -> None:
        # Pending probes are oldest first, so the scan stops at the first one not yet overdue.
        overdue_before_s = self._clock.monotonic() - self.config.slow_call_duration_s
        while (
            self._state is BreakerState.HALF_OPEN
            and self._probes_pending
            and self._probes_pending[0].started_s <= overdue_before_s
        ):
            self._probes_pending.pop(0)
            self._probe_verdict(failed=False, slow=True)

    def _probe_verdict(self, *, failed: bool, slow: bool) -> None:
        self._probes_done += 1
        self._probe_failures += failed
        self._probe_slow += slow
        planned = self.config.half_open_probes
        # Over all planned probes, not those back so far: the rest can only add to these counts.
        if self._over_threshold(self._probe_failures / planned, self._probe_slow / planned):
            self._transition(BreakerState.OPEN)
        elif self._probes_done >= planned:
            self._transition(BreakerState.CLOSED)

    def _over_threshold(self, failure_rate: float, slow_call_rate: float) -> bool:
        return (
            failure_rate >= self.config.failure_rate_threshold
            or slow_call_rate >= self.config.slow_call_rate_threshold
        )

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self.transitions += 1
        self._probes_admitted = self._probes_done = self._probe_failures = self._probe_slow = 0
        self._probes_pending.clear()
        self._consecutive_failures = 0
        if new is BreakerState.OPEN:
            if old is BreakerState.HALF_OPEN:
                self._reopenings += 1
                self._base_wait_s = min(
                    self.config.wait_cap_s, self._base_wait_s * self.config.wait_multiplier
                )
            jitter = self.config.wait_jitter * self._rng.random()
            self._open_wait_s = self._base_wait_s * (1.0 - jitter)
            self._opened_at_s = self._clock.monotonic()
            self._opened_at_wall = self._clock.now().isoformat().replace("+00:00", "Z")
        elif new is BreakerState.CLOSED:
            self._window.reset()
            self._opened_at_wall = None
            self._base_wait_s = self.config.wait_s
            self._reopenings = 0
        for hook in self._hooks:
            hook.on_state_change(self.name, old, new)


class _Guard:
    __slots__ = ("_breaker", "_is_failure", "_permit")

    def __init__(self, breaker: CircuitBreaker, is_failure: Callable[[BaseException], bool]) -> None:
        self._breaker = breaker
        self._is_failure = is_failure
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        self._permit = self._breaker.acquire()
        return self._permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self._permit
        if permit is None:
            return
        if exc is None:
            permit.success()
        elif isinstance(exc, asyncio.CancelledError):
            permit.ignore()
        else:
            permit.record(Outcome.FAILURE if self._is_failure(exc) else Outcome.SUCCESS)
