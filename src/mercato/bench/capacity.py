"""`mercato capacity plan`: resources for a peak, from what the benches measured (guide §22).

Read, never typed in: `bench scale`'s report.json (per process count: the highest rate meeting the
SLO, its p50/p99, the API processes' CPU; the USL fit) and, for checkouts, `bench checkout`'s
report.json (CPU ms per checkout per process, statements per checkout, saga step times).

The model, each figure with its formula (shown again in the output):

- throughput of N processes at the bench's SLO: the USL fitted on the measured points,
  X(N) = lambda N / (1 + sigma (N-1) + kappa N (N-1)); with `--p99-ms L` lambda is replaced by the
  highest 1-process rate whose p99 stayed below L (the same curve, scaled);
- processes: the smallest N with X(N) (1 - headroom) >= peak req/s + checkouts/s (a checkout is one
  request at the edge; its saga's cost is in the cores below); none if N passes the USL peak first;
- cores: (R * cpu_per_request + C * cpu_per_checkout) / (1 - headroom), cpu_per_request = API cores /
  rate at N = 1, cpu_per_checkout = the checkout bench's server CPU ms per checkout (all processes);
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
    "MissingMeasurement",
    "costs_from_reports",
    "cross_validated",
    "latest_report",
    "plan_capacity",
    "predicted_throughput",
]


class MissingMeasurement(ValueError):
    """A figure the plan needs was not measured (run the bench named in the message)."""


@dataclass(frozen=True)
class Costs:
    usl: UslFit
    points: dict[int, float]  # N -> measured max rate
    cpu_per_request_s: float
    p50_request_s: float
    slo_p99_ms: float
    one_process_steps: list[dict[str, Any]]
    body_bytes: int
    products: int
    cpu_per_checkout_s: float | None = None
    checkout_time_s: float | None = None
    saga_steps: int | None = None
    sources: dict[str, str] = field(default_factory=dict)


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


def costs_from_reports(scale: Path, checkout: Path | None = None) -> Costs:
    data = json.loads(scale.read_text())
    if data.get("kind") != "bench-scale":
        raise MissingMeasurement(f"{scale} is not a `mercato bench scale` report")
    points = {int(p["processes"]): float(p["max_rate"]) for p in data["points"] if p.get("max_rate")}
    if 1 not in points:
        raise MissingMeasurement("the scale report has no sustainable rate for 1 process")
    one = next(p for p in data["points"] if int(p["processes"]) == 1)
    if not one.get("api_cpu_cores") or one.get("p50_ms") is None:
        raise MissingMeasurement("the scale report lacks the 1-process CPU or latency")
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
        cpu_per_request_s=float(one["api_cpu_cores"]) / points[1],
        p50_request_s=float(one["p50_ms"]) / 1000,
        slo_p99_ms=float(data["slo"]["p99_ms"]),
        one_process_steps=list(one.get("steps") or []),
        body_bytes=body,
        products=int(data.get("products") or 0),
        sources=sources,
        **extra,
    )


@dataclass(frozen=True)
class CapacityPlan:
    peak_rps: float
    checkouts_per_s: float
    p99_ms: float
    headroom: float
    lambda_per_process: float
    processes: int | None
    throughput_at_processes: float | None
    usl_peak_n: float
    usl_peak_rps: float
    cores: float
    db_connections: int
    redis_bytes: int
    broker_msgs_per_s: float | None
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def lambda_at(costs: Costs, p99_ms: float | None) -> float:
    """Per-process throughput at the latency target: the USL's lambda, or, for a target other than
    the bench's SLO, scaled to the highest 1-process step that met it."""
    if p99_ms is None or p99_ms == costs.slo_p99_ms:
        return costs.usl.lam
    passing = [
        float(s["achieved_rate"])
        for s in costs.one_process_steps
        if float(s.get("p99_ms") or math.inf) < p99_ms and not s.get("errors")
    ]
    if not passing:
        raise MissingMeasurement(f"no 1-process step met p99 < {p99_ms:g} ms: measure lower rates")
    return costs.usl.lam * max(passing) / costs.points[1]


def predicted_throughput(costs: Costs, n: int, *, p99_ms: float | None = None) -> float:
    lam = lambda_at(costs, p99_ms)
    usl = costs.usl
    return UslFit(lam, usl.sigma, usl.kappa, usl.r2).throughput(n)


def cross_validated(costs: Costs, n: int) -> float:
    """X(n) predicted without n's own measurement: the USL fitted on the other points only (one
    point left: linear scaling from it). The honest check of the model against `bench scale`."""
    others = {k: v for k, v in costs.points.items() if k != n}
    if not others:
        raise MissingMeasurement("cross-validation needs at least two measured process counts")
    return fit_usl(list(others), list(others.values())).throughput(n)


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
    max_processes: int = 256,
) -> CapacityPlan:
    if peak_rps < 0 or checkouts_per_s < 0 or not 0 <= headroom < 1:
        raise ValueError("rates must be >= 0 and headroom in [0, 1)")
    notes: list[str] = []
    if checkouts_per_s > 0 and costs.cpu_per_checkout_s is None:
        raise MissingMeasurement("checkouts need the checkout costs: run `mercato bench checkout` first")
    lam = lambda_at(costs, p99_ms)
    usl = UslFit(lam, costs.usl.sigma, costs.usl.kappa, costs.usl.r2)
    need = (peak_rps + checkouts_per_s) / (1 - headroom)
    processes = next((n for n in range(1, max_processes + 1) if usl.throughput(n) >= need), None)
    if processes is not None and processes > usl.peak_n:
        processes = None
    if processes is None:
        best_n = max(1, round(usl.peak_n)) if math.isfinite(usl.peak_n) else max_processes
        notes.append(
            f"no process count reaches {need:.0f} req/s on this machine shape: the USL peaks at "
            f"N = {usl.peak_n:.1f} ({usl.throughput(best_n):.0f} req/s): "
            "scale out to more machines or remove the contention"
        )
    cpu_checkout = costs.cpu_per_checkout_s or 0.0
    cores = (peak_rps * costs.cpu_per_request_s + checkouts_per_s * cpu_checkout) / (1 - headroom)
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
    peak_n = usl.peak_n
    peak_rps_usl = usl.throughput(peak_n) if math.isfinite(peak_n) else math.inf
    return CapacityPlan(
        peak_rps=peak_rps,
        checkouts_per_s=checkouts_per_s,
        p99_ms=p99_ms if p99_ms is not None else costs.slo_p99_ms,
        headroom=headroom,
        lambda_per_process=lam,
        processes=processes,
        throughput_at_processes=usl.throughput(processes) if processes else None,
        usl_peak_n=peak_n,
        usl_peak_rps=peak_rps_usl,
        cores=round(cores, 3),
        db_connections=connections,
        redis_bytes=redis_bytes,
        broker_msgs_per_s=broker,
        notes=notes,
    )
