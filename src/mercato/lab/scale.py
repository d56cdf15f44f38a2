"""``mercato bench scale``: throughput and p99 of a mixed read workload against 1..N API processes
behind HAProxy on this machine, fitted with the Universal Scalability Law (guide §39, §22).

For each process count the fleet (`cluster.fleet.ApiFleet`: N `mercato api --workers 1` + HAProxy,
health-checked on /readyz) runs against one PostgreSQL database made for the run (migrated, seeded),
and the open-loop generator of `mercato bench http` searches the highest rate whose step meets the
SLO (p99 below `--slo-p99-ms`, no errors, >= 95 % of the offered rate achieved). The workload cycles
80 % `GET /v1/products/{id}` (500 ids) and 20 % `GET /v1/products?limit=20`. Each point records the
API processes' CPU (cores) at that rate, so `mercato capacity plan` can read the per-request cost.
Lives in `lab` (it drives `cluster` and `bench`, which may not import each other); registered as a
`bench` command.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.bench.runner import Bench, BenchOptions, Target, TargetReport, machine_facts
from mercato.bench.search import SearchPolicy
from mercato.bench.servers import (
    ServerProcess,
    body_size,
    machine_busy_s,
    migrate_and_seed,
    process_tree_cpu_s,
    product_paths,
)
from mercato.bench.stats import Slo
from mercato.bench.usl import UslFit, fit_usl
from mercato.cluster.fleet import ApiFleet
from mercato.cluster.processes import read_pid
from mercato.lab.rebalance_online import scratch_databases
from mercato.lab.scale_costs import CostProbe, ProbedBench

__all__ = ["ScalePoint", "run_scale", "scale_command"]

MIX_BY_ID = 8  # of every 10 requests; the other 2 list products


@dataclass
class ScalePoint:
    processes: int
    max_rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    api_cpu_cores: float | None
    machine_busy_cores: float | None
    steps: list[dict[str, Any]]
    # At the max rate: CPU ms per request of each part, busy cores, foreign load (`scale_costs`).
    costs: dict[str, Any] | None = None


class _FleetServer:
    """What `Bench.step` needs of a server: the port to load, and the CPU of what serves it."""

    def __init__(self, fleet: ApiFleet) -> None:
        self.fleet = fleet
        self.port = int(fleet.haproxy.port)
        self.name = f"fleet-{len(fleet.instances)}"

    def cpu_s(self) -> float | None:
        total = 0.0
        for instance in self.fleet.instances:
            pid = read_pid(self.fleet.folder, instance.name)
            cpu = process_tree_cpu_s(pid) if pid else None
            if cpu is None:
                return None
            total += cpu
        return total


def _mix(by_id: list[str]) -> tuple[str, ...]:
    paths: list[str] = []
    for i, path in enumerate(by_id):
        paths.append(path)
        if i % MIX_BY_ID == MIX_BY_ID - 1:
            paths += ["/v1/products?limit=20"] * (10 - MIX_BY_ID)
    return tuple(paths)


async def _measure(
    bench: Bench, target: Target, server: _FleetServer, url: str
) -> tuple[TargetReport, float | None, ProbedBench]:
    probe = CostProbe(server.fleet, url)
    probed = ProbedBench(bench, probe)
    try:
        busy_before, wall_before = machine_busy_s(), time.monotonic()
        report = await probed.search(target, cast(ServerProcess, server), lambda *_a: None)
        busy = (machine_busy_s() - busy_before) / (time.monotonic() - wall_before)
    finally:
        await probe.close()
    return report, busy, probed


def run_scale(
    *,
    processes: list[int],
    pg_dsn: str,
    options: BenchOptions,
    pool_size: int = 5,
    on_phase: Any = print,
) -> dict[str, Any]:
    machine = machine_facts()
    points: list[ScalePoint] = []
    body: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="mercato-scale-") as tmp:
        workdir = Path(tmp)

        dbs = scratch_databases(pg_dsn, "mercato_bench_scale", 1)
        loop = asyncio.new_event_loop()
        try:
            (url,) = loop.run_until_complete(dbs.__aenter__())
            on_phase("migrating and seeding")
            migrate_and_seed(url, workdir, products=options.products)
            env = {
                "MERCATO_DATABASE_URL": url,
                "MERCATO_RATELIMIT_ENABLED": "false",
                "MERCATO_DATABASE_POOL_SIZE": str(pool_size),
                "MERCATO_SEED_ENABLED": "false",
            }
            paths: tuple[str, ...] = ()
            executor = ProcessPoolExecutor(
                max_workers=options.generators, mp_context=multiprocessing.get_context("spawn")
            )
            with executor:
                bench = Bench(options, executor)
                for n in processes:
                    on_phase(f"{n} API process(es) behind HAProxy")
                    fleet = ApiFleet(workdir / f"fleet-{n}-{uuid.uuid4().hex[:6]}", instances=n, env=env)
                    fleet.start()
                    try:
                        if not paths:
                            by_id = product_paths(fleet.url, sample=options.id_sample)
                            paths = _mix(by_id)
                            body["product-by-id"] = body_size(fleet.url, by_id[0])
                        target = Target("mixed", "80% GET /v1/products/{id}, 20% list", "mercato", paths)
                        report, busy, probed = asyncio.run(_measure(bench, target, _FleetServer(fleet), url))
                    finally:
                        fleet.stop()
                    best = report.best_step
                    points.append(
                        ScalePoint(
                            processes=n,
                            max_rate=report.best_rate,
                            p50_ms=best.histogram.percentile_ms(50) if best else None,
                            p99_ms=best.p99_ms if best else None,
                            api_cpu_cores=best.server_cpu if best else None,
                            machine_busy_cores=busy,
                            steps=[{**s.to_dict(), "costs": probed.breakdown(s)} for s in report.steps],
                            costs=probed.breakdown(best) if best else None,
                        )
                    )
                    on_phase(f"  {n}: {report.best_rate} req/s")
        finally:
            loop.run_until_complete(dbs.__aexit__(None, None, None))
            loop.close()
    measured = [p for p in points if p.max_rate]
    fit = (
        fit_usl([p.processes for p in measured], [float(p.max_rate or 0) for p in measured])
        if measured
        else None
    )
    machine["loadavg_at_end"] = os.getloadavg()
    return {
        "kind": "bench-scale",
        "machine": machine,
        "workload": {"by_id_share": MIX_BY_ID / 10, "list_share": 1 - MIX_BY_ID / 10, "body_bytes": body},
        "products": options.products,
        "slo": {"p99_ms": options.slo.p99_ms, "max_errors": options.slo.max_errors},
        "settings": {"duration_s": options.duration_s, "warmup_s": options.warmup_s, "pool_size": pool_size},
        "points": [p.__dict__ for p in points],
        "usl": None if fit is None else {**fit.__dict__, "peak_n": fit.peak_n},
    }


def _table(data: dict[str, Any]) -> Table:
    table = Table(
        title=f"bench scale (SLO p99 < {data['slo']['p99_ms']:g} ms), "
        f"load {data['machine'].get('loadavg_at_start')}"
    )
    for col in ("API processes", "max req/s", "p50 ms", "p99 ms", "API cores", "machine cores", "USL req/s"):
        table.add_column(col, justify="right")
    usl = data["usl"]
    fit = UslFit(usl["lam"], usl["sigma"], usl["kappa"], usl["r2"]) if usl else None
    for p in data["points"]:
        table.add_row(
            str(p["processes"]),
            f"{p['max_rate']:.0f}" if p["max_rate"] else "-",
            f"{p['p50_ms']:.1f}" if p["p50_ms"] is not None else "-",
            f"{p['p99_ms']:.1f}" if p["p99_ms"] is not None else "-",
            f"{p['api_cpu_cores']:.2f}" if p["api_cpu_cores"] is not None else "-",
            f"{p['machine_busy_cores']:.2f}" if p["machine_busy_cores"] is not None else "-",
            f"{fit.throughput(p['processes']):.0f}" if fit else "-",
        )
    return table


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in data["points"] if p["max_rate"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax.plot([p["processes"] for p in pts], [p["max_rate"] for p in pts], "o", label="measured")
    usl = data["usl"]
    if usl:
        fit = UslFit(usl["lam"], usl["sigma"], usl["kappa"], usl["r2"])
        top = max(p["processes"] for p in pts) + 2
        xs = [1 + i * 0.1 for i in range(int((top - 1) * 10) + 1)]
        ax.plot(xs, [fit.throughput(x) for x in xs], "-", label=f"USL σ={fit.sigma:.3f} κ={fit.kappa:.4f}")
        ax.plot(xs, [fit.lam * x for x in xs], ":", color="grey", label="linear")
    ax.set_xlabel("API processes behind HAProxy")
    ax.set_ylabel("max sustainable req/s")
    ax.set_title(f"Throughput, {data['machine'].get('cpus', '?')} cores")
    ax.legend(fontsize=8)
    ax2.plot([p["processes"] for p in pts], [p["p99_ms"] for p in pts], "s-", color="tab:red")
    ax2.set_xlabel("API processes")
    ax2.set_ylabel("p99 ms at the max rate")
    ax2.set_title("p99 at the maximum sustainable rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scale_command(
    processes: Annotated[str, typer.Option(help="Process counts to measure, comma list")] = "1,2,3,4",
    pg_dsn: Annotated[
        str, typer.Option(help="PostgreSQL server where the run makes (and drops) its database")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    duration_s: Annotated[float, typer.Option(min=0.5, max=120)] = 4.0,
    warmup_s: Annotated[float, typer.Option(min=0, max=60)] = 2.0,
    slo_p99_ms: Annotated[float, typer.Option(min=1, max=10_000)] = 200.0,
    start_rate: Annotated[float, typer.Option(min=10, max=10_000)] = 100.0,
    max_steps: Annotated[int, typer.Option(min=2, max=30)] = 12,
    precision: Annotated[
        float, typer.Option(min=0.005, max=0.5, help="Bisect until the failing/passing rates differ by less")
    ] = 0.03,
    products: Annotated[int, typer.Option(min=20, max=100_000)] = 300,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Throughput and p99 vs API processes behind HAProxy (1..4), fitted with the USL and plotted."""
    if update_docs:
        check_docs_target("bench-scale")
    counts = sorted({int(p) for p in processes.split(",") if p.strip()})
    if not counts or min(counts) < 1 or max(counts) > 16:
        raise typer.BadParameter("process counts must be between 1 and 16")
    options = BenchOptions(
        duration_s=duration_s,
        warmup_s=warmup_s,
        pause_s=0.5,
        policy=SearchPolicy(start_rate=start_rate, max_steps=max_steps, precision=precision),
        slo=Slo(p99_ms=slo_p99_ms),
        products=products,
        id_sample=500,
        max_connections=256,
        timeout_s=5.0,
    )
    err = Console(stderr=True)
    data = run_scale(processes=counts, pg_dsn=pg_dsn, options=options, on_phase=lambda m: err.print(m))
    table = _table(data)
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        Console(width=160).print(table)
    usl = data["usl"]
    verdict = []
    if usl:
        verdict.append(
            f"USL fit: lambda {usl['lam']:.0f} req/s per process, contention sigma {usl['sigma']:.3f}, "
            f"coherency kappa {usl['kappa']:.4f}, R^2 {usl['r2']:.3f}, peak at N = {usl['peak_n']:.1f}"
        )
    run = RunFolder.open("bench-scale", out)
    _plot(data, run.figure)
    run.record(data=data, tables=[table], verdict=verdict, update_docs=update_docs, console=err)
