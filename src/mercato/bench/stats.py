"""Latency histograms, per-step counts, the pass/fail rule of a step and the ratio maths.

Every latency is measured from the request's *intended* send time (its slot in the timetable),
not from when it was actually written to the socket: a stalled server (or generator) therefore
shows up in the percentiles instead of silently pausing the schedule (coordinated omission).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # two minutes: anything slower is clamped (and is a timeout anyway)
SIGNIFICANT_FIGURES = 3


class LatencyHistogram:
    """An HDR histogram of latencies, recorded in microseconds, read in milliseconds."""

    def __init__(self) -> None:
        self._hist = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)

    def record_s(self, seconds: float) -> None:
        micros = min(HIGHEST_US, max(LOWEST_US, round(seconds * 1_000_000)))
        self._hist.record_value(micros)

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        """The latency at ``percentile`` (0-100) in ms; 0.0 for an empty histogram."""
        if self.count == 0:
            return 0.0
        return float(self._hist.get_value_at_percentile(percentile)) / 1000.0

    @property
    def max_ms(self) -> float:
        return float(self._hist.get_max_value()) / 1000.0 if self.count else 0.0

    def encode(self) -> str:
        """A compressed, base64 form to send between processes."""
        encoded = self._hist.encode()
        return encoded.decode("ascii") if isinstance(encoded, bytes) else str(encoded)

    def add_encoded(self, encoded: str) -> None:
        self._hist.decode_and_add(encoded.encode("ascii"))

    @classmethod
    def merged(cls, encoded: list[str]) -> LatencyHistogram:
        out = cls()
        for item in encoded:
            out.add_encoded(item)
        return out


@dataclass(slots=True)
class Counts:
    """What one generator process observed during one step (additive across processes).

    ``scheduled`` = ``ok + non_2xx + transport_errors + timeouts`` once a step has finished: a request
    never sent before the step's deadline counts as a timeout. ``late_sends`` counts requests written
    to the socket more than the lag threshold after their intended time, whatever the cause (the
    generator's own scheduling, or every pooled connection being busy); ``late_dispatches`` counts
    only those the generator's scheduler itself dispatched late (generator lag proper).
    """

    scheduled: int = 0
    sent: int = 0
    ok: int = 0
    non_2xx: int = 0
    # The non-2xx answers by status: a 503 the server shed under overload is not a 409 or a 500.
    non_2xx_statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    timeouts: int = 0
    late_sends: int = 0
    late_dispatches: int = 0
    max_dispatch_lag_s: float = 0.0
    first_due_s: float = 0.0
    last_done_s: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.transport_errors + self.timeouts

    @property
    def finished(self) -> int:
        return self.ok + self.errors

    def merge(self, other: Counts) -> Counts:
        firsts = [c.first_due_s for c in (self, other) if c.scheduled]
        return Counts(
            scheduled=self.scheduled + other.scheduled,
            sent=self.sent + other.sent,
            ok=self.ok + other.ok,
            non_2xx=self.non_2xx + other.non_2xx,
            non_2xx_statuses={
                status: self.non_2xx_statuses.get(status, 0) + other.non_2xx_statuses.get(status, 0)
                for status in self.non_2xx_statuses.keys() | other.non_2xx_statuses.keys()
            },
            transport_errors=self.transport_errors + other.transport_errors,
            timeouts=self.timeouts + other.timeouts,
            late_sends=self.late_sends + other.late_sends,
            late_dispatches=self.late_dispatches + other.late_dispatches,
            max_dispatch_lag_s=max(self.max_dispatch_lag_s, other.max_dispatch_lag_s),
            first_due_s=min(firsts) if firsts else 0.0,
            last_done_s=max(self.last_done_s, other.last_done_s),
            cpu_s=self.cpu_s + other.cpu_s,
            wall_s=max(self.wall_s, other.wall_s),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counts:
        statuses = data.get("non_2xx_statuses") or {}
        # From JSON (a generator process's result) the statuses' keys come back as strings.
        return cls(**{**data, "non_2xx_statuses": {int(k): int(v) for k, v in statuses.items()}})


def achieved_rate(*, ok: int, span_s: float, first_due_s: float, last_done_s: float) -> float:
    """Successful responses per second over ``max(span, first due -> last response)``.

    Dividing by at least the nominal span keeps the achieved rate at or below the offered one when
    everything succeeds on time; a server that falls behind stretches the elapsed time and the
    achieved rate drops below the offered rate.
    """
    elapsed = max(span_s, last_done_s - first_due_s)
    return ok / elapsed if elapsed > 0 else 0.0


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or ``None`` when either is unknown or the baseline is zero."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


@dataclass(frozen=True, slots=True)
class Slo:
    """The rule a step must meet to count as sustainable."""

    p99_ms: float = 100.0
    min_achieved_fraction: float = 0.95
    max_errors: int = 0

    def violations(self, result: StepResult) -> list[str]:
        """Why ``result`` is not sustainable (an empty list means it is)."""
        reasons = []
        if result.histogram.count == 0:
            reasons.append("no responses")
        elif result.p99_ms >= self.p99_ms:
            reasons.append(f"p99 {result.p99_ms:.1f} ms >= {self.p99_ms:g} ms")
        if result.counts.errors > self.max_errors:
            reasons.append(f"{result.counts.errors} errors")
        if result.achieved_rate < self.min_achieved_fraction * result.offered_rate:
            reasons.append(
                f"achieved {result.achieved_rate:.0f}/s < {self.min_achieved_fraction:.0%} of "
                f"{result.offered_rate:.0f}/s"
            )
        return reasons

    def passes(self, result: StepResult) -> bool:
        return not self.violations(result)


@dataclass(slots=True)
class StepResult:
    """One constant-rate step against one target, merged over the generator processes."""

    target: str
    offered_rate: float
    span_s: float
    counts: Counts
    histogram: LatencyHistogram
    server_cpu: float | None = None  # server CPU seconds per wall second (1.0 = one core busy)
    server_cpu_s: float | None = None  # server CPU seconds over the step
    notes: list[str] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        return achieved_rate(
            ok=self.counts.ok,
            span_s=self.span_s,
            first_due_s=self.counts.first_due_s,
            last_done_s=self.counts.last_done_s,
        )

    @property
    def p50_ms(self) -> float:
        return self.histogram.percentile_ms(50)

    @property
    def p95_ms(self) -> float:
        return self.histogram.percentile_ms(95)

    @property
    def p99_ms(self) -> float:
        return self.histogram.percentile_ms(99)

    @property
    def max_ms(self) -> float:
        return self.histogram.max_ms

    @property
    def cpu_us_per_request(self) -> float | None:
        """Server CPU (user + system, µs) per answered request: the figure comparable across a loaded
        machine's runs, where the rates are not (docs/benchmarks.md)."""
        if self.server_cpu_s is None or self.counts.ok == 0:
            return None
        return self.server_cpu_s / self.counts.ok * 1e6

    @property
    def generator_cpu_fraction(self) -> float:
        """Generator CPU seconds (all processes) per wall second over the step."""
        return self.counts.cpu_s / self.counts.wall_s if self.counts.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "target": self.target,
            "offered_rate": round(self.offered_rate, 1),
            "achieved_rate": round(self.achieved_rate, 1),
            "scheduled": c.scheduled,
            "sent": c.sent,
            "ok": c.ok,
            "errors": c.errors,
            "non_2xx": c.non_2xx,
            "non_2xx_statuses": {str(k): v for k, v in sorted(c.non_2xx_statuses.items())},
            "transport_errors": c.transport_errors,
            "timeouts": c.timeouts,
            "late_sends": c.late_sends,
            "late_dispatches": c.late_dispatches,
            "max_dispatch_lag_ms": round(c.max_dispatch_lag_s * 1000, 3),
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "generator_cpu": round(self.generator_cpu_fraction, 3),
            "server_cpu": None if self.server_cpu is None else round(self.server_cpu, 3),
            "server_cpu_us_per_request": None if (per := self.cpu_us_per_request) is None else round(per, 1),
        }
