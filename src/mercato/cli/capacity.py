"""`mercato capacity plan`: processes, cores, database connections, Redis memory and broker
throughput for a peak, computed from the benches' JSON reports (see `mercato.bench.capacity`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.capacity import (
    PARTS,
    MissingMeasurement,
    costs_from_reports,
    cross_validated,
    latest_report,
    plan_capacity,
    predicted_throughput,
)
from mercato.bench.harness import RESULTS_ROOT

__all__ = ["app"]

app = typer.Typer(help="Capacity planning from measured costs.", no_args_is_help=True)
_err = Console(stderr=True)


@app.command()
def plan(
    peak_rps: Annotated[float, typer.Option("--peak-rps", min=0, help="Peak requests per second")],
    checkouts_per_s: Annotated[
        float, typer.Option("--checkouts-per-s", min=0, help="Peak checkouts/s")
    ] = 0.0,
    p99_ms: Annotated[
        float | None, typer.Option("--p99-ms", min=1, help="p99 target (default: the bench's SLO)")
    ] = None,
    headroom: Annotated[float, typer.Option(min=0, max=0.9, help="Share kept free (0.3 = 30 %)")] = 0.3,
    scale_report: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="`bench scale` report.json (default: newest)"),
    ] = None,
    checkout_report: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="`bench checkout` report.json (default: newest)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What a peak of R req/s and C checkouts/s needs, from the benches' measured per-request costs."""
    scale = scale_report or latest_report(RESULTS_ROOT, "bench-scale")
    if scale is None:
        _err.print(
            "[red]error:[/red] no `mercato bench scale` report found: run it first (or --scale-report)"
        )
        raise typer.Exit(2)
    checkout = checkout_report or (
        latest_report(RESULTS_ROOT, "bench-checkout") if checkouts_per_s > 0 else None
    )
    try:
        costs = costs_from_reports(scale, checkout)
        result = plan_capacity(
            costs, peak_rps=peak_rps, checkouts_per_s=checkouts_per_s, p99_ms=p99_ms, headroom=headroom
        )
    except MissingMeasurement as exc:
        _err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    ref = costs.reference
    model = {
        n: {
            "measured_rps": costs.points.get(n),
            "foreign_cores": c.foreign_cores,
            "fixed_api_cores_per_process": c.fixed_cores,
            "marginal_api_cpu_ms_per_request": c.api_s * 1000,
            "efficiency_at_slo": c.efficiency,
            "bottleneck": c.bottleneck(n, costs.cores, c.foreign_cores),
            "predicted_rps": predicted_throughput(costs, n),
            "cross_validated_rps": cross_validated(costs, n) if len(costs.cpu) > 1 else None,
        }
        for n, c in sorted(costs.cpu.items())
    }
    data = {
        "plan": result.as_dict(),
        "costs": {
            "cores": costs.cores,
            "cpu_ms_per_request": {part: v * 1000 for part, v in ref.cpu_s.items()},
            "cpu_ms_per_request_by_processes": {
                n: {part: v * 1000 for part, v in c.cpu_s.items()} for n, c in sorted(costs.cpu.items())
            },
            "efficiency_at_slo": ref.efficiency,
            "usl": {"lambda": costs.usl.lam, "sigma": costs.usl.sigma, "kappa": costs.usl.kappa},
            "served_cpu_ms_per_request": costs.cpu_per_request_s * 1000,
            "p50_ms_per_request": costs.p50_request_s * 1000,
            "cpu_ms_per_checkout": None
            if costs.cpu_per_checkout_s is None
            else costs.cpu_per_checkout_s * 1000,
            "measured_rps": costs.points,
            "predicted_rps": {n: m["predicted_rps"] for n, m in model.items()},
            "cross_validated_rps": {n: m["cross_validated_rps"] for n, m in model.items()},
            "model": model,
            "sources": costs.sources,
        },
    }
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    console = Console(width=160)
    table = Table(
        title=f"capacity for {peak_rps:g} req/s + {checkouts_per_s:g} checkouts/s, "
        f"p99 < {result.p99_ms:g} ms, {headroom:.0%} headroom"
    )
    table.add_column("resource")
    table.add_column("needed", justify="right")
    table.add_column("from")
    table.add_row(
        "API processes",
        str(result.processes),
        f"{result.per_process_rps:.0f} req/s each = u {ref.efficiency:.2f} / {ref.api_s * 1000:.2f} ms "
        "API CPU per request (one core each)",
    )
    table.add_row(
        "CPU cores",
        f"{result.cores:.2f}",
        f"{costs.cpu_per_request_s * 1000:.2f} ms CPU per request (API + PostgreSQL + HAProxy)",
    )
    table.add_row(
        "DB connections", str(result.db_connections), f"Little's law, p50 {costs.p50_request_s * 1000:.1f} ms"
    )
    table.add_row(
        "Redis memory",
        f"{result.redis_bytes / 1e6:.1f} MB",
        f"{costs.products} products x {costs.body_bytes} B",
    )
    table.add_row(
        "broker",
        "-" if result.broker_msgs_per_s is None else f"{result.broker_msgs_per_s:.0f} msg/s",
        "saga steps per checkout" if result.broker_msgs_per_s is not None else "no checkout report",
    )
    console.print(table)
    parts = Table(title="CPU ms per request at the max rate (bench scale's probes; API, machine: marginal)")
    parts.add_column("API processes", justify="right")
    for part in (*PARTS, "machine", "API marginal", "API fixed cores/process", "foreign cores", "u"):
        parts.add_column(part, justify="right")
    for n, c in sorted(costs.cpu.items()):
        parts.add_row(
            str(n),
            *(f"{c.cpu_s[p] * 1000:.3f}" for p in PARTS),
            f"{c.machine_s * 1000:.3f}",
            f"{c.api_s * 1000:.3f}",
            f"{c.fixed_cores:.3f}",
            f"{c.foreign_cores:.2f}",
            f"{c.efficiency:.2f}",
        )
    console.print(parts)
    check = Table(
        title=f"the model against the measurement ({costs.cores} cores): "
        "X(N) = u min(N (1 - fixed) / api, (cores - foreign - N fixed) / machine), "
        "costs as measured at N; cross-validated: u from another N"
    )
    for col in (
        "API processes",
        "measured req/s",
        "bottleneck",
        "u from 1 process",
        "cross-validated",
        "USL",
    ):
        check.add_column(col, justify="right")
    for n, m in model.items():
        cv, measured = m["cross_validated_rps"], costs.points[n]
        check.add_row(
            str(n),
            f"{m['measured_rps']:.0f}",
            str(m["bottleneck"]),
            f"{m['predicted_rps']:.0f}",
            "-" if not isinstance(cv, float) else f"{cv:.0f} ({cv / measured - 1:+.0%})",
            f"{costs.usl.throughput(n):.0f}",
        )
    console.print(check)
    for note in result.notes:
        console.print(f"- {note}")
