"""What ``mercato lab breaker`` is configured with and what it measures: the options (outage, load, the
PSP breaker's settings, the variants), one run's raw samples, and the per-phase summaries cut at the
breaker's own transitions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from mercato.config import CheckoutSettings

PAYMENT_STEP = "authorize_payment"
# An attempt this long waited on the PSP: fail-fast refusals and healthy calls take milliseconds, a
# hung attempt the per-attempt timeout (1 s) or more.
SLOW_ATTEMPT_S = 0.5
PHASES = ("before", "detection", "open", "recovery")
CHECKOUT_DEFAULTS = CheckoutSettings()

OutageMode = Literal["hang", "error"]
Variant = Literal["on", "shared", "off"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)


@dataclass(frozen=True, kw_only=True)
class BreakerOptions:
    outage_s: float = 30.0
    rate: float = 10.0
    duration_s: float = 60.0
    # After the load stops, wait this long at most for every saga to reach a terminal state.
    drain_s: float = 60.0
    # The PSP breaker's knobs; the defaults are the shop's (`CheckoutSettings`).
    breaker_minimum_calls: int = CHECKOUT_DEFAULTS.breaker_minimum_calls
    breaker_consecutive_failures: int = CHECKOUT_DEFAULTS.breaker_consecutive_failures
    breaker_open_s: float = CHECKOUT_DEFAULTS.breaker_open_s
    breaker_max_open_s: float = CHECKOUT_DEFAULTS.breaker_max_open_s
    breaker_half_open_probes: int = CHECKOUT_DEFAULTS.breaker_half_open_probes
    outage_mode: OutageMode = "hang"
    variants: tuple[Variant, ...] = VARIANTS
    seed: int = 7
    # A PostgreSQL server URL (a throwaway database is made on it per run); None = SQLite files.
    # SQLite's single writer is what an outage's pile-up of parked sagas saturates first at ~10/s.
    database_url: str | None = None
    # The throwaway databases are named `<prefix>_<12 hex>` (sharing a server: a prefix of your own).
    database_prefix: str = "mercato_lab"

    def __post_init__(self) -> None:
        if self.outage_s <= 0 or self.rate <= 0 or self.duration_s <= self.outage_s:
            raise ValueError("need outage_s > 0, rate > 0 and duration_s > outage_s")
        if self.outage_mode not in get_args(OutageMode):
            raise ValueError(f"outage_mode must be one of {get_args(OutageMode)}")
        if not self.database_prefix.replace("_", "").isalnum():
            raise ValueError("database_prefix: letters, digits and underscores only")
        if not self.variants or any(v not in VARIANTS for v in self.variants):
            raise ValueError(f"variants must be a non-empty selection of {VARIANTS}")
        if self.breaker_half_open_probes < 1 or self.breaker_consecutive_failures < 0:
            raise ValueError("need breaker_half_open_probes >= 1 and breaker_consecutive_failures >= 0")
        if self.breaker_minimum_calls < 1 or min(self.breaker_open_s, self.breaker_max_open_s) < 0:
            raise ValueError("need breaker_minimum_calls >= 1 and open waits >= 0")

    @property
    def outage_start_s(self) -> float:
        """The outage sits in the middle of the load."""
        return (self.duration_s - self.outage_s) / 2

    @property
    def outage_end_s(self) -> float:
        return self.outage_start_s + self.outage_s


@dataclass
class RunResult:
    """One run's raw observations; times are seconds since the load started."""

    mode: str  # a Variant: "on" | "shared" | "off"
    # (t started, seconds, outcome) per authorize_payment attempt
    attempts: list[tuple[float, float, str]] = field(default_factory=list)
    # (t started, seconds to terminal, status) per checkout
    checkouts: list[tuple[float, float, str]] = field(default_factory=list)
    # (t sent, seconds) of CheckoutService.start (what POST /v1/checkout waits for), and its failures
    starts: list[tuple[float, float]] = field(default_factory=list)
    start_errors: int = 0
    # (t, from, to) per transition of the PSP writes' breaker
    breaker_log: list[tuple[float, str, str]] = field(default_factory=list)
    # (t, PSP /v1 requests received in the second ending at t)
    psp_rate: list[tuple[float, float]] = field(default_factory=list)
    psp_total: int = 0
    psp_reads_total: int = 0
    # compensation attempts the saga recorded as refused by an open circuit (nothing was sent)
    compensations_refused: int = 0
    breaker_opened: int = 0
    breaker_transitions: int = 0
    # calls refused by the open circuit of the PSP's lookups' own breaker ("psp-reads")
    read_breaker_rejections: int = 0
    unfinished: int = 0


def percentile_ms(values_s: Sequence[float], percentile: float) -> float:
    """Nearest-rank percentile (0-100) of durations in seconds, in ms; 0.0 when there are none."""
    if not values_s:
        return 0.0
    ordered = sorted(values_s)
    rank = max(1, math.ceil(percentile / 100.0 * len(ordered)))
    return round(ordered[rank - 1] * 1000.0, 1)


def phase_bounds(run: RunResult, options: BreakerOptions) -> dict[str, tuple[float, float]]:
    """`[from, to)` of each phase on the run's timeline (see the module docstring); `open` is empty
    when the breaker never opened during the outage."""
    start, end = options.outage_start_s, options.outage_end_s
    trip = next((t for t, _, new in run.breaker_log if new == "open" and start <= t < end), end)
    return {
        "before": (-math.inf, start),
        "detection": (start, trip),
        "open": (trip, end),
        "recovery": (end, math.inf),
    }


def _phase_row(run: RunResult, low: float, high: float) -> dict[str, Any]:
    attempts = [s for t, s, _ in run.attempts if low <= t < high]
    starts = [s for t, s in run.starts if low <= t < high]
    # A sample at t counts the second (t-1, t]: it belongs to the phase if most of that second does.
    rates = [r for t, r in run.psp_rate if low <= t - 0.5 < high]
    return {
        "span_s": round(high - low, 2) if math.isfinite(high - low) else None,
        "payment_attempts": len(attempts),
        "payment_slow_attempts": sum(1 for s in attempts if s >= SLOW_ATTEMPT_S),
        "payment_p50_ms": percentile_ms(attempts, 50),
        "payment_p99_ms": percentile_ms(attempts, 99),
        "checkout_start_p50_ms": percentile_ms(starts, 50),
        "checkout_start_p99_ms": percentile_ms(starts, 99),
        "psp_rps": round(sum(rates) / len(rates), 2) if rates else None,
    }


def summarize(run: RunResult, options: BreakerOptions) -> dict[str, Any]:
    """The table row of one run. "During the outage" = attempts/checkouts/samples in its window."""
    start, end = options.outage_start_s, options.outage_end_s
    all_attempts = [s for _, s, _ in run.attempts]
    outage_attempts = [s for t, s, _ in run.attempts if start <= t < end]
    outage_terminal = [s for t, s, _ in run.checkouts if start <= t < end]
    all_terminal = [s for _, s, _ in run.checkouts]
    all_starts = [s for _, s in run.starts]
    # A sample at t counts the second (t-1, t]: it belongs to the outage if that second does.
    rates = [r for t, r in run.psp_rate if start < t <= end + 1e-9]
    statuses: dict[str, int] = {}
    for _, _, status in run.checkouts:
        statuses[status] = statuses.get(status, 0) + 1
    bounds = phase_bounds(run, options)
    tripped = bounds["open"][0] < end
    reclosed = next((t for t, _, new in run.breaker_log if new == "closed" and t >= end), None)
    return {
        "mode": run.mode,
        "checkouts": len(run.checkouts),
        "statuses": statuses,
        "unfinished": run.unfinished,
        "checkout_start_p50_ms": percentile_ms(all_starts, 50),
        "checkout_start_p99_ms": percentile_ms(all_starts, 99),
        "checkout_start_errors": run.start_errors,
        "payment_attempts": len(run.attempts),
        "payment_p50_ms": percentile_ms(all_attempts, 50),
        "payment_p99_ms": percentile_ms(all_attempts, 99),
        "payment_outage_attempts": len(outage_attempts),
        "payment_outage_slow_attempts": sum(1 for s in outage_attempts if s >= SLOW_ATTEMPT_S),
        "payment_outage_p50_ms": percentile_ms(outage_attempts, 50),
        "payment_outage_p99_ms": percentile_ms(outage_attempts, 99),
        "terminal_outage_p50_ms": percentile_ms(outage_terminal, 50),
        "terminal_outage_p99_ms": percentile_ms(outage_terminal, 99),
        "terminal_p50_ms": percentile_ms(all_terminal, 50),
        "terminal_p99_ms": percentile_ms(all_terminal, 99),
        "psp_outage_rps": round(sum(rates) / len(rates), 2) if rates else 0.0,
        "psp_total_requests": run.psp_total,
        "psp_reads_total": run.psp_reads_total,
        "compensations_refused": run.compensations_refused,
        "breaker_opened": run.breaker_opened,
        "breaker_transitions": run.breaker_transitions,
        "read_breaker_rejections": run.read_breaker_rejections,
        "trip_after_s": round(bounds["open"][0] - start, 2) if tripped else None,
        # From the outage's end until the breaker closed again (its next probe succeeded).
        "reclosed_after_s": round(reclosed - end, 2) if reclosed is not None else None,
        "phases": {name: _phase_row(run, low, high) for name, (low, high) in bounds.items()},
    }


@dataclass
class ExperimentReport:
    options: BreakerOptions
    runs: list[RunResult]

    def rows(self) -> list[dict[str, Any]]:
        return [summarize(run, self.options) for run in self.runs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": asdict(self.options),
            "outage_window_s": [self.options.outage_start_s, self.options.outage_end_s],
            "runs": self.rows(),
            "series": {run.mode: per_second(run, self.options) for run in self.runs},
            # (t, from, to) of the PSP writes' breaker: where the phases were cut, and every probe.
            "breaker_transitions": {run.mode: run.breaker_log for run in self.runs},
        }


def per_second(run: RunResult, options: BreakerOptions) -> dict[str, list[float]]:
    """The plot's series: PSP req/s and the p99 of payment attempts, per whole second of the run."""
    seconds = math.ceil(options.duration_s + options.drain_s)
    buckets: dict[int, list[float]] = {}
    for t, s, _ in run.attempts:
        buckets.setdefault(int(t), []).append(s)
    last = max([int(t) for t, _ in run.psp_rate] + list(buckets) + [0])
    xs = list(range(min(seconds, last + 1)))
    p99 = [percentile_ms(buckets[x], 99) if x in buckets else float("nan") for x in xs]
    return {
        "psp_t": [t for t, _ in run.psp_rate],
        "psp_rps": [r for _, r in run.psp_rate],
        "t": [float(x) for x in xs],
        "payment_p99_ms": p99,
    }
