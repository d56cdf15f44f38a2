"""Client-side load balancing over a fixed set of endpoints (guide §30), with outlier ejection.

Three choice policies, each picking among the endpoints the outlier detector has not ejected:

- `round_robin`: the next endpoint in turn; blind to load, so a slow endpoint gets its full share
  and its slowness shows in the caller's tail latency;
- `least_outstanding`: the endpoint with the fewest requests in flight *from this client* (ties in
  turn); a slow endpoint accumulates in-flight requests and so receives fewer new ones;
- `p2c` (power of two choices, Mitzenmacher): two distinct endpoints at random, the one with fewer in
  flight; nearly as good as least outstanding, without every client herding onto the same minimum.

Use: `lease = balancer.acquire()`, call `lease.endpoint`, then `lease.release(outcome)` (exactly
once; a second release is ignored). The balancer never raises for a failed call: it counts it.
Time and randomness are injectable.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from mercato.kit.balancing.outlier import EjectionHooks, Outcome, OutlierDetector, OutlierSettings

__all__ = ["Balancer", "BalancerHooks", "BalancerStats", "Lease", "Policy"]


class BalancerHooks(EjectionHooks, Protocol):
    """Metrics: every released call, plus the detector's ejections."""

    def on_release(self, endpoint: str, outcome: Outcome) -> None: ...


class Policy(Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING = "least_outstanding"
    P2C = "p2c"


@dataclass(frozen=True, slots=True)
class BalancerStats:
    endpoint: str
    in_flight: int
    picked: int
    failures: int
    ejected: bool
    times_ejected: int


class Lease:
    """One call's hold on an endpoint: counted in flight until released."""

    __slots__ = ("_balancer", "_released", "endpoint")

    def __init__(self, balancer: Balancer, endpoint: str) -> None:
        self._balancer = balancer
        self.endpoint = endpoint
        self._released = False

    def release(self, outcome: Outcome) -> None:
        if self._released:
            return
        self._released = True
        self._balancer._release(self.endpoint, outcome)

    def success(self) -> None:
        self.release(Outcome.SUCCESS)


class Balancer:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        policy: Policy | str = Policy.LEAST_OUTSTANDING,
        outlier: OutlierSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        hooks: Sequence[BalancerHooks] = (),
    ) -> None:
        if not endpoints:
            raise ValueError("a balancer needs at least one endpoint")
        self.endpoints = list(dict.fromkeys(endpoints))
        self.policy = Policy(policy)
        self.detector = OutlierDetector(self.endpoints, outlier, clock=clock, hooks=hooks)
        self._hooks = list(hooks)
        self._rng = rng or random.Random()
        self._next = 0
        self._index = {e: i for i, e in enumerate(self.endpoints)}
        self._in_flight = dict.fromkeys(self.endpoints, 0)
        self._picked = dict.fromkeys(self.endpoints, 0)
        self._failures = dict.fromkeys(self.endpoints, 0)

    def in_flight(self, endpoint: str) -> int:
        return self._in_flight[endpoint]

    def acquire(self) -> Lease:
        """Choose an endpoint by the policy among those in service (all of them if, with
        `always_eject_one` or a 100 % cap, every one is ejected: Envoy's panic mode)."""
        candidates = self.detector.available() or self.endpoints
        endpoint = self._choose(candidates)
        self._in_flight[endpoint] += 1
        self._picked[endpoint] += 1
        return Lease(self, endpoint)

    def _choose(self, candidates: list[str]) -> str:
        if len(candidates) == 1:
            return candidates[0]
        if self.policy is Policy.P2C:
            a, b = self._rng.sample(candidates, 2)
            return a if self._in_flight[a] <= self._in_flight[b] else b
        if self.policy is Policy.LEAST_OUTSTANDING:
            fewest = min(self._in_flight[e] for e in candidates)
            candidates = [e for e in candidates if self._in_flight[e] == fewest]
        # In turn from the cursor: round robin over the candidates, and ties of least outstanding
        # rotate instead of always favouring the first endpoint.
        n = len(self.endpoints)
        chosen = min(candidates, key=lambda e: (self._index[e] - self._next) % n)
        self._next = (self._index[chosen] + 1) % n
        return chosen

    def _release(self, endpoint: str, outcome: Outcome) -> None:
        self._in_flight[endpoint] -= 1
        if outcome is not Outcome.SUCCESS:
            self._failures[endpoint] += 1
        self.detector.record(endpoint, outcome)
        for hook in self._hooks:
            hook.on_release(endpoint, outcome)

    def stats(self) -> list[BalancerStats]:
        ejected = set(self.detector.ejected())
        return [
            BalancerStats(
                endpoint=e,
                in_flight=self._in_flight[e],
                picked=self._picked[e],
                failures=self._failures[e],
                ejected=e in ejected,
                times_ejected=self.detector.times_ejected(e),
            )
            for e in self.endpoints
        ]
