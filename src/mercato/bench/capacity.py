"""`mercato capacity plan`: resources for a peak, from what the benches measured (guide §22).

Read, never typed in: `bench scale`'s report.json (per process count: the highest rate meeting the
SLO, its p50/p99, the API processes' CPU; the USL fit) and, for checkouts, `bench checkout`'s
report.json (CPU ms per checkout per process, statements per checkout, saga step times).

The model, each figure with its formula (shown again in the output; ADR 0057):

- throughput of N API processes on a machine of `cores` cores, `foreign` of them taken by other
  work while the bench ran, from the CPU each part spends per request (`bench scale` probes them:
  the API processes, the PostgreSQL backends, HAProxy, the load generator; `lab/scale_costs.py`) and
  each API process's CPU as a line in its rate, `fixed` cores + `api` per request (fitted over the
  point's steps: a process pays `fixed` whatever its share of the load):
  capacity(N) = min(N (1 - fixed) / api, (cores - foreign - N fixed) / machine), api the marginal API
  CPU per request, machine the sum of the parts' marginal CPU per request: one process is at most
  one core of its own CPU, and all parts together at most the free cores. The bench's figure is the
  highest rate whose p99 met the SLO, a fraction `u` of that CPU ceiling (the bottleneck's
  utilisation at the SLO, measured where the costs were: u = measured / capacity there), so
  X(N) = u * capacity(N), capacity(N) from what N processes cost per request (`costs_at`: measured
  at N, else at the nearest measured count; splitting a rate over more processes raises every part's
  CPU per request, ADR 0057's revision) and u carried from the reference point. With `--p99-ms L`
  the 1-process rate is scaled to the highest 1-process step whose p99 stayed below L;
- processes: the smallest N with N * X(1) (1 - headroom) >= peak req/s + checkouts/s, X(1) the
  per-process rate on a machine with the cores below (a checkout is one request at the edge; its
  saga's cost is in the cores);
- cores: (R * served + C * cpu_per_checkout) / (1 - headroom) + N * fixed, served = the per-request
  CPU of the parts a production machine runs (API, PostgreSQL, HAProxy: not the load generator),
  cpu_per_checkout = the checkout bench's server CPU ms per checkout (all processes);
- database connections (Little's law: each in-flight request holds at most one):
  (R * p50_request + C * (p50_checkout_post + saga time)) / (1 - headroom);
- Redis memory: the product cache (products * measured body bytes * `redis_overhead`) plus one
  rate-limit bucket per active client (`clients` * `bucket_bytes`); the two factors are assumptions
  and printed as such;
- broker: C * (saga steps per checkout + 1) messages/s (one integration event per saga step plus the
  order's outcome: an assumption about the saga, printed as such).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercato.bench.usl import UslFit, fit_usl

__all__ = [
    "CapacityPlan",
    "Costs",
    "CpuCosts",
    "MissingMeasurement",
    "costs_at",
    "costs_from_reports",
    "cross_validated",
    "latest_report",
    "plan_capacity",
    "predicted_throughput",
]

PARTS = ("api", "postgres", "haproxy", "generator")
SERVED = ("api", "postgres", "haproxy")  # what a production machine runs per request


class MissingMeasurement(ValueError):
    """A figure the plan needs was not measured (run the bench named in the message)."""


@dataclass(frozen=True)
class CpuCosts:
    """One `bench scale` point: CPU seconds per request of each part at its max rate, the API
    processes' CPU as fixed cores per process plus marginal CPU per request, and the machine's
    foreign load (cores) during the max-rate step."""

    processes: int
    rate: float
    cpu_s: dict[str, float]  # per request at the max rate, everything each part spent
    fixed_cores: float  # per API process, whatever its rate (`_api_line`)
    marginal_api_s: float  # API CPU per request beyond that (0: not fitted)
    foreign_cores: float
    cores: float  # the machine's

    @property
    def api_s(self) -> float:
        """Marginal API CPU per request (the fitted line's slope; without a fit, all of it)."""
        return self.marginal_api_s or self.cpu_s["api"]

    @property
    def machine_s(self) -> float:
        """Marginal machine CPU per request: every part's (the API's marginal one)."""
        return self.api_s + sum(self.cpu_s[p] for p in PARTS if p != "api")

    @property
    def served_s(self) -> float:
        return self.api_s + sum(self.cpu_s[p] for p in SERVED if p != "api")

    def limits(self, n: int, cores: float, foreign: float) -> tuple[float, float]:
        """(n processes' own ceiling, the machine's): each process at most one core of its own CPU,
        fixed cost included; all parts together at most the free cores."""
        own = n * max(0.0, 1 - self.fixed_cores) / self.api_s
        machine = max(0.0, cores - foreign - n * self.fixed_cores) / self.machine_s
        return own, machine

    def ceiling(self, n: int, cores: float, foreign: float) -> float:
        return min(self.limits(n, cores, foreign))

    def bottleneck(self, n: int, cores: float, foreign: float) -> str:
        own, machine = self.limits(n, cores, foreign)
        return "API process" if own <= machine else "machine"

    @property
    def efficiency(self) -> float:
        """u: the measured SLO rate over this point's own CPU ceiling (the bottleneck's utilisation
        when p99 reached the SLO)."""
        return self.rate / self.ceiling(self.processes, self.cores, self.foreign_cores)


@dataclass(frozen=True)
class Costs:
    usl: UslFit
    points: dict[int, float]  # N -> measured max rate
    cpu: dict[int, CpuCosts]  # N -> the per-request CPU measured there
    cores: int
    cpu_per_request_s: float  # the served parts' CPU per request at N = 1 (cores in production)
    p50_request_s: float
    slo_p99_ms: float
    one_process_steps: list[dict[str, Any]]
    body_bytes: int
    products: int
    cpu_per_checkout_s: float | None = None
    checkout_time_s: float | None = None
    saga_steps: int | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> CpuCosts:
        """The point the plan reads its costs from: 1 process (the smallest count measured)."""
        return self.cpu[min(self.cpu)]


def latest_report(root: Path, name: str) -> Path | None:
    """The newest `<root>/<name>/<stamp>/report.json`, if any."""
    found = sorted((root / name).glob("*/report.json"))
    return found[-1] if found else None


def _checkout_costs(data: Any) -> tuple[float, float, int] | None:
    """From a `bench checkout` report: the highest-rate step that measured CPU per checkout."""
    steps: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "server_cpu_ms_per_checkout" in node and node.get("server_cpu_ms_per_checkout"):
                steps.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    if not steps:
        return None
    step = max(steps, key=lambda s: float(s.get("completed_rate") or 0))
    cpu_s = sum(float(v) for v in step["server_cpu_ms_per_checkout"].values()) / 1000
    saga = step.get("saga_step_mean_ms") or {}
    post_ms = float((step.get("post") or {}).get("p50_ms") or 0)
    time_s = (post_ms + sum(float(v) for v in saga.values())) / 1000
    return cpu_s, time_s, len(saga)


def _point_costs(point: dict[str, Any], cores: int) -> CpuCosts | None:
    """The point's per-request CPU at its max rate, the foreign load during that step, and its API
    processes' CPU as a line in their rate (`_api_line`)."""
    best = point.get("costs")
    if not point.get("max_rate") or not best:
        return None
    per_request = best["cpu_ms_per_request"]
    if not per_request.get("api"):
        return None
    n = int(point["processes"])
    fixed, marginal = _api_line(point.get("steps") or [], n)
    return CpuCosts(
        processes=n,
        rate=float(point["max_rate"]),
        cpu_s={part: float(per_request.get(part) or 0.0) / 1000 for part in PARTS},
        fixed_cores=fixed,
        marginal_api_s=marginal,
        foreign_cores=float(best.get("foreign_cores") or 0.0),
        cores=float(cores),
    )


def _api_line(steps: list[dict[str, Any]], n: int) -> tuple[float, float]:
    """One API process's CPU (cores) against its request rate over the point's steps, fitted as a
    line: cores = fixed + marginal * rate. `fixed` is what a process burns whether it serves 100 or
    400 req/s (its event loop's turns, wake-ups and background loops, amortised over more requests the
    busier it is), `marginal` the CPU of one more request. Why per-request CPU grows with processes
    at a given total rate: each process pays `fixed`. Least squares over every step (the CPU a rate
    costs does not depend on whether its p99 met the SLO); (0, 0) if the steps cannot tell."""
    xs: list[float] = []
    ys: list[float] = []
    for step in steps:
        costs, rate = step.get("costs"), float(step.get("achieved_rate") or 0)
        if costs and rate > 0:
            xs.append(rate / n)
            ys.append(float(costs["cpu_ms_per_request"]["api"]) / 1000 * rate / n)
    if len(set(xs)) < 2:
        return 0.0, 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    if slope <= 0 or not 0 <= fixed < 1:
        return 0.0, 0.0
    return fixed, slope


def costs_from_reports(scale: Path, checkout: Path | None = None) -> Costs:
    data = json.loads(scale.read_text())
    if data.get("kind") != "bench-scale":
        raise MissingMeasurement(f"{scale} is not a `mercato bench scale` report")
    points = {int(p["processes"]): float(p["max_rate"]) for p in data["points"] if p.get("max_rate")}
    if 1 not in points:
        raise MissingMeasurement("the scale report has no sustainable rate for 1 process")
    cores = int(data["machine"]["cpus"])
    cpu = {c.processes: c for p in data["points"] if (c := _point_costs(p, cores)) is not None}
    one = next(p for p in data["points"] if int(p["processes"]) == 1)
    if 1 not in cpu or one.get("p50_ms") is None:
        raise MissingMeasurement(
            "the scale report lacks the 1-process CPU breakdown or latency: run `mercato bench scale` again"
        )
    usl = fit_usl(list(points), list(points.values()))
    body = int(next(iter(data["workload"]["body_bytes"].values()), 0))
    extra: dict[str, Any] = {}
    sources = {"scale": str(scale)}
    if checkout is not None:
        found = _checkout_costs(json.loads(checkout.read_text()))
        if found is None:
            raise MissingMeasurement(f"{checkout} has no step with CPU per checkout")
        extra = {"cpu_per_checkout_s": found[0], "checkout_time_s": found[1], "saga_steps": found[2]}
        sources["checkout"] = str(checkout)
    return Costs(
        usl=usl,
        points=points,
        cpu=cpu,
        cores=cores,
        cpu_per_request_s=cpu[1].served_s,
        p50_request_s=float(one["p50_ms"]) / 1000,
        slo_p99_ms=float(data["slo"]["p99_ms"]),
        one_process_steps=list(one.get("steps") or []),
        body_bytes=body,
        products=int(data.get("products") or 0),
        sources=sources,
        **extra,
    )


def slo_scale(costs: Costs, p99_ms: float | None) -> float:
    """For a latency target other than the bench's SLO: the highest 1-process rate whose p99 met it,
    over the 1-process max rate (1.0 for the bench's own SLO)."""
    if p99_ms is None or p99_ms == costs.slo_p99_ms:
        return 1.0
    passing = [
        float(s["achieved_rate"])
        for s in costs.one_process_steps
        if float(s.get("p99_ms") or math.inf) < p99_ms and not s.get("errors")
    ]
    if not passing:
        raise MissingMeasurement(f"no 1-process step met p99 < {p99_ms:g} ms: measure lower rates")
    return max(passing) / costs.points[1]


def costs_at(costs: Costs, n: int) -> CpuCosts:
    """What a deployment of n processes costs per request: measured at n when `bench scale` ran it,
    else at the nearest measured count (ties: the smaller). Splitting one rate over more processes
    than the cores can keep busy raises every part's CPU per request (on 2 cores, 1 -> 2 processes:
    +29 % at 1,600 req/s, `docs/benchmarks.md` "Session 8 (lead)"), which one shape's costs cannot
    tell: measure the shape you deploy."""
    return costs.cpu[min(costs.cpu, key=lambda k: (abs(k - n), k))]


def predict_from(costs: Costs, utilisation: CpuCosts, n: int, *, p99_ms: float | None = None) -> float:
    """X(n) = u * capacity(n) (module docstring): capacity from what n processes cost per request
    (`costs_at`), u from the `utilisation` point."""
    shape = costs_at(costs, n)
    ceiling = shape.ceiling(n, costs.cores, shape.foreign_cores)
    return utilisation.efficiency * ceiling * slo_scale(costs, p99_ms)


def predicted_throughput(costs: Costs, n: int, *, p99_ms: float | None = None) -> float:
    """X(n) with u from the reference point (1 process)."""
    return predict_from(costs, costs.reference, n, p99_ms=p99_ms)


def cross_validated(costs: Costs, n: int) -> float:
    """X(n) predicted without n's throughput: u from the nearest other measured process count, the CPU
    per request from n's own costs (`costs_at`). The honest check of the model against `bench scale`:
    the rate at which n processes reach the SLO is never an input."""
    others = [k for k in costs.cpu if k != n]
    if not others:
        raise MissingMeasurement("cross-validation needs at least two measured process counts")
    return predict_from(costs, costs.cpu[min(others, key=lambda k: (abs(k - n), k))], n)


@dataclass(frozen=True)
class CapacityPlan:
    peak_rps: float
    checkouts_per_s: float
    p99_ms: float
    headroom: float
    per_process_rps: float  # u / api: one process at the latency target
    processes: int
    throughput_at_processes: float
    machine_ceiling_rps: float  # this machine (its free cores) at the latency target
    machine_processes: int  # beyond this many processes this machine gains nothing
    cores: float
    db_connections: int
    redis_bytes: int
    broker_msgs_per_s: float | None
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_capacity(
    costs: Costs,
    *,
    peak_rps: float,
    checkouts_per_s: float,
    p99_ms: float | None = None,
    headroom: float = 0.3,
    active_clients: int | None = None,
    redis_overhead: float = 2.0,
    bucket_bytes: int = 200,
) -> CapacityPlan:
    if peak_rps < 0 or checkouts_per_s < 0 or not 0 <= headroom < 1:
        raise ValueError("rates must be >= 0 and headroom in [0, 1)")
    notes: list[str] = []
    if checkouts_per_s > 0 and costs.cpu_per_checkout_s is None:
        raise MissingMeasurement("checkouts need the checkout costs: run `mercato bench checkout` first")
    ref = costs.reference
    scale = slo_scale(costs, p99_ms)
    per_process = ref.efficiency * scale * ref.limits(1, costs.cores, 0.0)[0]
    need = (peak_rps + checkouts_per_s) / (1 - headroom)
    processes = max(1, math.ceil(round(need / per_process, 6)))
    # This machine: the most its free cores give, and from how many processes on.
    best_n, machine_ceiling = 1, 0.0
    for n in range(1, 65):
        shape = costs_at(costs, n)
        rate = ref.efficiency * scale * shape.ceiling(n, costs.cores, shape.foreign_cores)
        if rate <= machine_ceiling * 1.001:
            break
        best_n, machine_ceiling = n, rate
    machine_processes = best_n
    if need > machine_ceiling:
        notes.append(
            f"this machine ({costs.cores} cores, {ref.foreign_cores:.2f} busy with other work) tops out "
            f"at {machine_ceiling:.0f} req/s from {machine_processes} process(es) on: the peak needs "
            "the cores below, on more or bigger machines"
        )
    cpu_checkout = costs.cpu_per_checkout_s or 0.0
    cores = (peak_rps * ref.served_s + checkouts_per_s * cpu_checkout) / (1 - headroom)
    cores += processes * ref.fixed_cores
    in_flight = peak_rps * costs.p50_request_s + checkouts_per_s * (costs.checkout_time_s or 0.0)
    connections = max(1, math.ceil(round(in_flight / (1 - headroom), 6)))
    clients = active_clients if active_clients is not None else int(peak_rps * 10)
    redis_bytes = int(costs.products * costs.body_bytes * redis_overhead + clients * bucket_bytes)
    notes.append(
        f"assumed: Redis stores a value in {redis_overhead:g}x its bytes, "
        f"a rate-limit bucket in {bucket_bytes} B, "
        f"{clients} active clients (default 10 s of peak requests, one client each)"
    )
    broker = None
    if costs.saga_steps is not None:
        broker = checkouts_per_s * (costs.saga_steps + 1)
        notes.append("assumed: one integration event per saga step plus the order's outcome")
    return CapacityPlan(
        peak_rps=peak_rps,
        checkouts_per_s=checkouts_per_s,
        p99_ms=p99_ms if p99_ms is not None else costs.slo_p99_ms,
        headroom=headroom,
        per_process_rps=per_process,
        processes=processes,
        throughput_at_processes=processes * per_process,
        machine_ceiling_rps=machine_ceiling,
        machine_processes=machine_processes,
        cores=round(cores, 3),
        db_connections=connections,
        redis_bytes=redis_bytes,
        broker_msgs_per_s=broker,
        notes=notes,
    )
