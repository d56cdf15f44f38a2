"""The pure parts of ``mercato bench checkout``: the rate ladder, completion accounting, report maths.

Three latencies are kept per checkout, all in HDR histograms (`LatencyHistogram`):

- **accept**: from the checkout's intended time (its slot in the open-loop timetable) to the
  ``202`` of ``POST /v1/checkout``. It includes the ``PUT`` of the cart line that precedes the
  POST, and any wait for a free connection, so a stalled server cannot hide (coordinated omission).
- **POST**: from when the POST could be sent (the PUT's answer arrived) to its ``202``: the cost of
  the checkout request alone.
- **completion**: from the checkout's intended time to ``saga_instances.finished_at`` of its order
  saga (read from the database after the step, so the client does not poll), for sagas that ended
  ``completed``.

A checkout is identified end to end by its request id ``<tag>-<index>``: the POST carries it as
``X-Request-ID`` and the checkout service stores it as the saga's ``correlation_id``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mercato.bench.stats import Counts, LatencyHistogram, achieved_rate, ratio

DEFAULT_RATES = (25.0, 50.0, 100.0, 200.0)
# Below this share of the offered rate completing, higher rates only measure a deeper backlog.
SATURATED_BELOW = 0.5
# `CheckoutStep.server_cpu_s` keys beside the servers' names: the whole machine's busy time, every
# PostgreSQL process's CPU, and the load generator's (the bench itself: not the system's cost).
MACHINE = "machine (all)"
POSTGRESQL = "postgresql (all)"
LOAD_GENERATOR = "load generator"


def rate_ladder(rates: Iterable[float] | None = None) -> tuple[float, ...]:
    """The fixed arrival rates to measure, ascending and without repeats (the default ladder if none)."""
    chosen = tuple(DEFAULT_RATES if rates is None else rates)
    if not chosen:
        raise ValueError("the rate ladder needs at least one rate")
    for rate in chosen:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rates must be positive finite numbers, not {rate!r}")
    return tuple(sorted(set(chosen)))


def request_id(tag: str, index: int) -> str:
    """The X-Request-ID (and so the saga's correlation id) of checkout ``index`` of a step."""
    return f"{tag}-{index}"


def index_of(tag: str, correlation_id: str) -> int | None:
    """The checkout index encoded in a correlation id, or None when it belongs to another step."""
    prefix = f"{tag}-"
    if not correlation_id.startswith(prefix):
        return None
    tail = correlation_id[len(prefix) :]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True, slots=True)
class SagaOutcome:
    """What the database says about one checkout's saga after the step."""

    correlation_id: str
    status: str  # running | compensating | completed | compensated | failed
    finished_wall_s: float | None


@dataclass(slots=True)
class Completion:
    """The completion side of one step: how many sagas ended how, and their latency."""

    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    completed: int = 0
    compensated: int = 0  # ended without an order (declined, out of stock, deadline...)
    failed: int = 0  # needs attention
    unfinished: int = 0  # still running when the drain ended
    unknown: int = 0  # an accepted checkout whose saga was not found (must stay 0)
    last_finished_wall_s: float = 0.0

    @property
    def accounted(self) -> int:
        return self.completed + self.compensated + self.failed + self.unfinished + self.unknown


def account_completions(
    *,
    tag: str,
    accepted: Mapping[int, float],
    outcomes: Iterable[SagaOutcome],
) -> Completion:
    """Match accepted checkouts (index → intended wall time) with their sagas' outcomes.

    Every accepted checkout is counted exactly once: ``accounted == len(accepted)``. A saga whose
    correlation id is not an accepted checkout of this step (another step's, or one whose 202 was
    lost to a client timeout) is ignored.
    """
    out = Completion()
    seen: set[int] = set()
    for outcome in outcomes:
        index = index_of(tag, outcome.correlation_id)
        if index is None or index not in accepted or index in seen:
            continue
        seen.add(index)
        if outcome.status == "completed" and outcome.finished_wall_s is not None:
            out.completed += 1
            out.histogram.record_s(max(0.0, outcome.finished_wall_s - accepted[index]))
            out.last_finished_wall_s = max(out.last_finished_wall_s, outcome.finished_wall_s)
        elif outcome.status == "compensated":
            out.compensated += 1
        elif outcome.status == "failed":
            out.failed += 1
        else:
            out.unfinished += 1
    out.unknown = len(accepted) - len(seen)
    return out


def per_checkout(totals: Mapping[str, float], checkouts: int) -> dict[str, float]:
    """Each phase's count divided by the number of checkouts (empty when there were none)."""
    if checkouts <= 0:
        return {}
    return {phase: value / checkouts for phase, value in sorted(totals.items())}


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` per key (a key new in ``after`` counts from zero); zero deltas dropped."""
    out = {key: value - before.get(key, 0) for key, value in after.items()}
    return {key: value for key, value in out.items() if value}


def _ms(hist: LatencyHistogram, pct: float) -> float:
    return round(hist.percentile_ms(pct), 2)


def latency_dict(hist: LatencyHistogram) -> dict[str, float | int]:
    return {
        "count": hist.count,
        "p50_ms": _ms(hist, 50),
        "p95_ms": _ms(hist, 95),
        "p99_ms": _ms(hist, 99),
        "max_ms": round(hist.max_ms, 2),
    }


@dataclass(slots=True)
class BaselineStep:
    """The same arrival rate and request pattern (two sequential requests on one connection per
    "checkout") against the bare endpoint, measured just before the Mercato step."""

    counts: Counts
    histogram: LatencyHistogram  # slot -> second response


@dataclass(slots=True)
class CheckoutStep:
    """One fixed-rate step: what the client saw, what the database says, what it cost."""

    offered_rate: float
    span_s: float
    counts: Counts  # per checkout: ok = the POST answered 202
    accept: LatencyHistogram
    post: LatencyHistogram
    completion: Completion
    first_due_wall_s: float
    baseline: BaselineStep | None = None
    statements: dict[str, float] = field(default_factory=dict)  # per phase, over the step
    transactions: dict[str, float] = field(default_factory=dict)
    server_cpu: dict[str, float] = field(default_factory=dict)  # process -> cores busy
    # Process -> CPU seconds over the step and its drain. Per completed checkout it is the figure
    # least distorted by other load on a shared machine: starvation stretches time, not CPU.
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    step_ms: dict[str, float] = field(default_factory=dict)  # saga step -> mean duration_ms
    wait_to_first_step_ms: float | None = None  # saga created -> first worker step started
    new_sessions_per_s: float | None = None  # PostgreSQL sessions opened on the database (any client)

    @property
    def accepted_rate(self) -> float:
        """Checkouts answered 202 per second (the achieved POST rate)."""
        return achieved_rate(
            ok=self.counts.ok,
            span_s=self.span_s,
            first_due_s=self.counts.first_due_s,
            last_done_s=self.counts.last_done_s,
        )

    @property
    def completed_rate(self) -> float:
        """Completed sagas per second over ``max(span, first due -> last completion)``."""
        return achieved_rate(
            ok=self.completion.completed,
            span_s=self.span_s,
            first_due_s=self.first_due_wall_s,
            last_done_s=self.completion.last_finished_wall_s,
        )

    @property
    def system_cpu_s(self) -> float | None:
        """The machine's busy time less the load generator's: what the system under test cost
        (servers, simulators, PostgreSQL and the kernel's work for them). None without both figures."""
        if MACHINE not in self.server_cpu_s or LOAD_GENERATOR not in self.server_cpu_s:
            return None
        return self.server_cpu_s[MACHINE] - self.server_cpu_s[LOAD_GENERATOR]

    @property
    def saturated(self) -> bool:
        return self.completed_rate < SATURATED_BELOW * self.offered_rate

    @property
    def accept_vs_bare_p50(self) -> float | None:
        """How many times the bare endpoint's p50 (same pattern, same rate) one checkout's accept takes."""
        if self.baseline is None:
            return None
        return ratio(self.accept.percentile_ms(50), self.baseline.histogram.percentile_ms(50))

    def round_trips_per_checkout(self) -> dict[str, float]:
        return per_checkout(self.statements, self.completion.completed)

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        done = self.completion
        share = self.accept_vs_bare_p50
        return {
            "offered_rate": round(self.offered_rate, 1),
            "accepted_rate": round(self.accepted_rate, 1),
            "completed_rate": round(self.completed_rate, 1),
            "saturated": self.saturated,
            "checkouts": {
                "scheduled": c.scheduled,
                "sent": c.sent,
                "accepted": c.ok,
                "errors": c.errors,
                "non_2xx": c.non_2xx,
                "non_2xx_statuses": {str(k): v for k, v in sorted(c.non_2xx_statuses.items())},
                "transport_errors": c.transport_errors,
                "timeouts": c.timeouts,
                "late_sends": c.late_sends,
                "late_dispatches": c.late_dispatches,
            },
            "sagas": {
                "completed": done.completed,
                "compensated": done.compensated,
                "failed": done.failed,
                "unfinished": done.unfinished,
                "unknown": done.unknown,
            },
            "accept": latency_dict(self.accept),
            "post": latency_dict(self.post),
            "completion": latency_dict(done.histogram),
            "baseline": None
            if self.baseline is None
            else {
                "ok": self.baseline.counts.ok,
                "errors": self.baseline.counts.errors,
                **latency_dict(self.baseline.histogram),
            },
            "accept_p50_vs_bare_p50": None if share is None else round(share, 1),
            "statements_per_checkout": {k: round(v, 2) for k, v in self.round_trips_per_checkout().items()},
            "transactions_per_checkout": {
                k: round(v, 2) for k, v in per_checkout(self.transactions, done.completed).items()
            },
            "server_cpu": {k: round(v, 3) for k, v in self.server_cpu.items()},
            "server_cpu_ms_per_checkout": {
                k: round(v * 1000, 1) for k, v in per_checkout(self.server_cpu_s, done.completed).items()
            },
            "system_cpu_ms_per_checkout": None
            if self.system_cpu_s is None or not done.completed
            else round(self.system_cpu_s * 1000 / done.completed, 1),
            "saga_step_mean_ms": {k: round(v, 1) for k, v in self.step_ms.items()},
            "wait_to_first_step_ms": None
            if self.wait_to_first_step_ms is None
            else round(self.wait_to_first_step_ms, 1),
            "new_sessions_per_s": None
            if self.new_sessions_per_s is None
            else round(self.new_sessions_per_s, 2),
        }


def mean_by_key(pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The mean value per key of ``(key, value)`` pairs."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key, value in pairs:
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}
