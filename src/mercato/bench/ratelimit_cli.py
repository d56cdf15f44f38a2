"""``mercato bench ratelimit``: the command (options, progress, the tables, the run folder)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder
from mercato.bench.ratelimit import DEFAULT_LADDER, PRODUCT_LADDER, run_ratelimit_bench
from mercato.bench.ratelimit_decisions import DecisionRates
from mercato.bench.ratelimit_server import ENDPOINTS
from mercato.bench.runner import (
    BenchOptions,
    BenchReport,
)
from mercato.bench.search import SearchPolicy
from mercato.bench.stats import Slo, StepResult


def _fmt(value: float | None, unit: str = "/s") -> str:
    return "—" if value is None else f"{value:,.0f}{unit}"


def _overhead_table(report: BenchReport) -> Table:
    table = Table(
        title=f"Limiter overhead: max sustainable rate (p99 < {report.options.slo.p99_ms:g} ms, 0 errors)"
    )
    for column in ("variant", "max rate", "vs bare", "goal", "p50 ms", "p99 ms", "server CPU"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    goals = {"token-bucket-memory": "≥ 90%", "token-bucket-redis": "≥ 75%"}
    for item in report.targets:
        step = item.best_step
        share = report.ratio(item)
        cpu = step.server_cpu if step else None
        table.add_row(
            item.target.endpoint,
            _fmt(item.best_rate),
            "—" if share is None else f"{share:.0%}",
            goals.get(item.target.name, ""),
            f"{step.p50_ms:.2f}" if step else "—",
            f"{step.p99_ms:.2f}" if step else "—",
            "—" if cpu is None else f"{cpu:.0%}",
        )
    return table


def _decisions_table(rates: DecisionRates) -> Table:
    table = Table(title="Token-bucket decisions per second on Redis (the same EVALSHA script)")
    table.add_column("client", no_wrap=True)
    table.add_column("decisions/s", justify="right")
    table.add_column("vs redis-benchmark -P 1", justify="right")
    table.add_column("client CPU µs / decision", justify="right")

    def share(value: float) -> str:
        return "—" if not rates.redis_benchmark else f"{value / rates.redis_benchmark:.0%}"

    table.add_row(
        f"RedisLimiter.hit, {rates.concurrency} asyncio tasks, pipelined connection (gateway)",
        _fmt(rates.client_loop),
        share(rates.client_loop),
        f"{rates.client_loop_cpu_us:.1f}",
    )
    table.add_row(
        f"RedisLimiter.hit, {rates.concurrency} asyncio tasks, redis-py pool",
        _fmt(rates.client_loop_redis_py),
        share(rates.client_loop_redis_py),
        f"{rates.client_loop_redis_py_cpu_us:.1f}",
    )
    table.add_row(
        f"redis-py pipeline, batches of {rates.batch}",
        _fmt(rates.client_pipelined),
        share(rates.client_pipelined),
        "",
    )
    if rates.redis_benchmark is not None:
        table.add_row(
            f"redis-benchmark -c {rates.bench_clients} -P 1", _fmt(rates.redis_benchmark), "100%", ""
        )
    if rates.redis_benchmark_pipelined is not None:
        table.add_row(
            f"redis-benchmark -c {rates.bench_clients} -P {rates.batch}",
            _fmt(rates.redis_benchmark_pipelined),
            share(rates.redis_benchmark_pipelined),
            "",
        )
    return table


def ratelimit_command(
    duration: Annotated[float, typer.Option(help="Seconds per constant-rate step", min=0.5)] = 5.0,
    warmup: Annotated[float, typer.Option(help="Warm-up seconds per variant (not measured)", min=0)] = 2.0,
    endpoint: Annotated[
        str,
        typer.Option(
            help="empty: the bare Starlette endpoint (worst case); product: the shop's GET /v1/products/{id}"
        ),
    ] = "empty",
    rates: Annotated[
        str | None,
        typer.Option(
            help="The rate ladder, comma-separated (default 500 ... 8000 req/s; product: 150 ... 1000)"
        ),
    ] = None,
    p99_ms: Annotated[float, typer.Option(help="Sustainable only while p99 is below this (ms)")] = 100.0,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes per variant", min=1)] = 1,
    generators: Annotated[int, typer.Option(help="Load generator processes", min=1, max=16)] = 1,
    connections: Annotated[int, typer.Option(help="Connection pool bound (all generators)", min=1)] = 256,
    redis_url: Annotated[str, typer.Option(help="The Redis to measure")] = "redis://127.0.0.1:6379/0",
    decision_seconds: Annotated[
        float, typer.Option(help="Seconds per client-side decision loop", min=0.5)
    ] = 5.0,
    http: Annotated[bool, typer.Option(help="Run the HTTP overhead comparison")] = True,
    decisions: Annotated[bool, typer.Option(help="Run the Redis decisions/s comparison")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
    out: OutOption = None,
) -> None:
    """Bare endpoint vs token bucket on memory vs on Redis; Redis decisions/s vs redis-benchmark."""
    console = Console(stderr=True)
    if endpoint not in ENDPOINTS:
        raise typer.BadParameter(f"endpoint must be one of {', '.join(ENDPOINTS)}")
    default = PRODUCT_LADDER if endpoint == "product" else DEFAULT_LADDER
    try:
        ladder = tuple(float(item) for item in rates.split(",") if item.strip()) if rates else default
    except ValueError as exc:
        raise typer.BadParameter("rates are comma-separated numbers, e.g. 500,1000,2000") from exc
    if not ladder or any(rate <= 0 for rate in ladder):
        raise typer.BadParameter("rates must be positive")
    options = BenchOptions(
        duration_s=duration,
        warmup_s=warmup,
        policy=SearchPolicy(start_rate=min(ladder)),
        rates=ladder,
        slo=Slo(p99_ms=p99_ms),
        workers=workers,
        generators=generators,
        max_connections=connections,
    )
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("preparing", total=None)

    def on_step(name: str, number: int, rate: float, result: StepResult | None) -> None:
        if result is None:
            label = "warm-up" if number == 0 else f"step {number}: {rate:,.0f}/s"
            progress.update(task, description=f"[bold]{name}[/bold] {label}")
            return
        verdict = "[green]ok[/green]" if not result.notes else f"[red]{'; '.join(result.notes)}[/red]"
        progress.console.print(
            f"  {name:<20} {rate:>9,.0f}/s  achieved {result.achieved_rate:>9,.0f}/s  "
            f"p99 {result.p99_ms:8.2f} ms  errors {result.counts.errors:<5} {verdict}"
        )

    try:
        with progress:
            report = run_ratelimit_bench(
                options,
                redis_url=redis_url,
                http=http,
                decisions=decisions,
                decision_seconds=decision_seconds,
                endpoint=endpoint,
                on_phase=lambda message: progress.update(task, description=message),
                on_step=on_step,
            )
    except (RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    tables = [
        *([_overhead_table(report.http)] if report.http is not None else []),
        *([_decisions_table(report.decisions)] if report.decisions is not None else []),
    ]
    notes = report.decisions.notes if report.decisions is not None else []
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for table in tables:
            Console().print(table)
        if report.http is not None:
            machine = report.http.machine
            console.print(
                f"load average start/end: {machine.get('loadavg_at_start')} / {machine.get('loadavg_at_end')}"
            )
        for note in notes:
            console.print(f"[yellow]{note}[/yellow]")
    RunFolder.open("bench-ratelimit", out).record(
        data=report.to_dict(), tables=tables, verdict=notes, console=console
    )
