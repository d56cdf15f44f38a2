"""``mercato bench http``: the open-loop HTTP benchmark, as a typer sub-app."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mercato.bench.checkout_cli import checkout as checkout_command
from mercato.bench.eventstore import eventstore_command
from mercato.bench.harness import OutOption, RunFolder
from mercato.bench.one_process import one_process_command
from mercato.bench.ratelimit_cli import ratelimit_command
from mercato.bench.runner import TARGETS, BenchOptions, BenchReport, run_http_bench
from mercato.bench.search import SearchPolicy
from mercato.bench.stats import Slo, StepResult

app = typer.Typer(
    help="Benchmarks: open-loop load against a Mercato started for the run.", no_args_is_help=True
)
console = Console(stderr=True)


def _rates(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        rates = tuple(float(item) for item in value.split(",") if item.strip())
    except ValueError as exc:
        raise typer.BadParameter("rates are comma-separated numbers, e.g. 500,1000,2000") from exc
    if not rates or any(r <= 0 for r in rates):
        raise typer.BadParameter("rates must be positive")
    return rates


def _fmt_rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate:,.0f}/s"


def _table(report: BenchReport) -> Table:
    table = Table(
        title=f"Max sustainable rate (p99 < {report.options.slo.p99_ms:g} ms, 0 errors, ≥95% achieved)"
    )
    columns = ["endpoint", "max rate", "vs bare", "p50 ms", "p95 ms", "p99 ms", "max ms", "server CPU"]
    columns += ["CPU µs/req", "vs bare CPU"]
    # Against the bare baseline's step at the same offered rate (CPU per request falls as the rate
    # grows: fixed per-wake-up costs are shared by more requests), else at its best rate.
    bare_by_rate = {s.offered_rate: s.cpu_us_per_request for s in report.baseline.steps}
    bare_best = report.baseline.best_step
    if report.raw_db is not None:
        columns.insert(3, "vs asyncpg")
    for column in columns:
        table.add_column(column, justify="left" if column == "endpoint" else "right", no_wrap=True)
    for item in report.targets:
        step = item.best_step
        share = report.ratio(item)
        cpu = step.server_cpu if step else None
        raw_share = report.ratio_vs_raw(item)
        raw_cell = [] if report.raw_db is None else ["—" if raw_share is None else f"{raw_share:.0%}"]
        table.add_row(
            item.target.endpoint,
            _fmt_rate(item.best_rate),
            "—" if share is None else f"{share:.0%}",
            *raw_cell,
            f"{step.p50_ms:.2f}" if step else "—",
            f"{step.p95_ms:.2f}" if step else "—",
            f"{step.p99_ms:.2f}" if step else "—",
            f"{step.max_ms:.2f}" if step else "—",
            "—" if cpu is None else f"{cpu:.0%}",
            *_cpu_cells(
                step.cpu_us_per_request if step else None,
                bare_by_rate.get(step.offered_rate) if step else None,
                bare_best.cpu_us_per_request if bare_best else None,
            ),
        )
    return table


def _cpu_cells(us: float | None, bare_same_rate: float | None, bare_best: float | None) -> list[str]:
    """Server CPU per request, and the bare baseline's over it (the rate ratio on a CPU-bound server)."""
    bare_us = bare_same_rate if bare_same_rate is not None else bare_best
    if us is None:
        return ["—", "—"]
    return [f"{us:,.0f}", "—" if bare_us is None else f"{bare_us / us:.0%}"]


@app.command("http")
def http(
    duration: Annotated[float, typer.Option(help="Seconds per constant-rate step", min=0.5)] = 5.0,
    warmup: Annotated[float, typer.Option(help="Warm-up seconds per target (not measured)", min=0)] = 2.0,
    start_rate: Annotated[float, typer.Option(help="First rate tried (req/s)", min=1)] = 250.0,
    max_rate: Annotated[float, typer.Option(help="Never offer more than this (req/s)", min=1)] = 50_000.0,
    growth: Annotated[float, typer.Option(help="Ramp factor between steps before the first failure")] = 2.0,
    precision: Annotated[float, typer.Option(help="Stop bisecting when hi/lo - 1 is below this")] = 0.05,
    rates: Annotated[
        str | None, typer.Option(help="Try exactly these rates instead of searching, e.g. 500,1000")
    ] = None,
    p99_ms: Annotated[float, typer.Option(help="Sustainable only while p99 is below this (ms)")] = 100.0,
    database_url: Annotated[
        str | None,
        typer.Option(help="Benchmark on this database (e.g. PostgreSQL) instead of a temporary SQLite file"),
    ] = None,
    create_database: Annotated[
        bool,
        typer.Option(help="Create the --database-url database first and drop it afterwards (PostgreSQL)"),
    ] = False,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes for both servers", min=1)] = 1,
    generators: Annotated[int, typer.Option(help="Load generator processes", min=1, max=16)] = 1,
    connections: Annotated[int, typer.Option(help="Connection pool bound (all generators)", min=1)] = 256,
    timeout: Annotated[float, typer.Option(help="Per-request timeout from its intended send time (s)")] = 2.0,
    products: Annotated[int, typer.Option(help="Demo products to seed", min=1)] = 1200,
    target: Annotated[
        list[str] | None, typer.Option(help=f"Targets to measure besides the baseline: {', '.join(TARGETS)}")
    ] = None,
    baseline: Annotated[str, typer.Option(help="Bare baseline: starlette or asgi")] = "starlette",
    app_cache: Annotated[
        bool, typer.Option("--app-cache/--no-app-cache", help="Mercato's application cache on or off")
    ] = True,
    min_ratio: Annotated[
        float | None, typer.Option(help="Fail (exit 1) if product-by-id's ratio vs bare is below this")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
    out: OutOption = None,
) -> None:
    """Find the maximum sustainable rate of the bare baseline and of catalog reads, side by side."""
    targets = tuple(target) if target else TARGETS
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise typer.BadParameter(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    if baseline not in ("starlette", "asgi"):
        raise typer.BadParameter("--baseline is starlette or asgi")
    try:
        policy = SearchPolicy(
            start_rate=start_rate,
            growth=growth,
            precision=precision,
            min_rate=min(10.0, start_rate),
            max_rate=max_rate,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    options = BenchOptions(
        duration_s=duration,
        warmup_s=warmup,
        policy=policy,
        rates=_rates(rates),
        slo=Slo(p99_ms=p99_ms),
        workers=workers,
        generators=generators,
        max_connections=connections,
        timeout_s=timeout,
        database_url=database_url,
        create_database=create_database,
        products=products,
        targets=targets,
        baseline_kind=baseline,
        app_cache=app_cache,
    )
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("preparing", total=None)

    def on_phase(message: str) -> None:
        progress.update(task, description=message)

    def on_step(name: str, number: int, rate: float, result: StepResult | None) -> None:
        if result is None:
            label = "warm-up" if number == 0 else f"step {number}: {rate:,.0f}/s"
            progress.update(task, description=f"[bold]{name}[/bold] {label}")
            return
        verdict = "[green]ok[/green]" if not result.notes else f"[red]{'; '.join(result.notes)}[/red]"
        progress.console.print(
            f"  {name:<14} {rate:>9,.0f}/s  achieved {result.achieved_rate:>9,.0f}/s  "
            f"p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:8.2f} ms  errors {result.counts.errors:<5} "
            f"late {result.counts.late_dispatches:<5} {verdict}"
        )

    try:
        with progress:
            report = run_http_bench(options, on_phase=on_phase, on_step=on_step)
    except (RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(_table(report))
        console.print(
            f"body bytes: {report.body_bytes}; database: {report.database}; "
            f"load average start/end: {report.machine.get('loadavg_at_start')} / "
            f"{report.machine.get('loadavg_at_end')}"
        )
    RunFolder.open("bench-http", out).record(data=report.to_dict(), tables=[_table(report)], console=console)
    if not report.complete:
        console.print("[red]a target never met the SLO at any rate tried[/red]")
        raise typer.Exit(1)
    by_id = next((t for t in report.targets if t.target.name == "product-by-id"), None)
    if min_ratio is not None and by_id is not None:
        share = report.ratio(by_id)
        if share is None or share < min_ratio:
            console.print(f"[red]product-by-id is {share or 0:.0%} of bare, below {min_ratio:.0%}[/red]")
            raise typer.Exit(1)


# `mercato bench checkout` lives in its own module; registered here so `bench` has one sub-app.
app.command("checkout")(checkout_command)
# `mercato bench ratelimit`: limiter overhead at the edge and Redis decisions/s vs redis-benchmark.
app.command("ratelimit")(ratelimit_command)
# `mercato bench eventstore`: append/replay events/s, our event store vs the `eventsourcing` library.
app.command("eventstore")(eventstore_command)

app.command("one-process")(one_process_command)


@app.command("realtime")
def realtime(
    connections: Annotated[int, typer.Option(help="WebSocket connections (0: only --idle)", min=0)] = 1000,
    rooms: Annotated[int, typer.Option(help="Rooms (each connection follows one)", min=1)] = 50,
    rate: Annotated[float, typer.Option(help="Messages sent per second, over all rooms", min=1)] = 100,
    seconds: Annotated[float, typer.Option(help="Sending time per server", min=1)] = 10,
    idle: Annotated[int, typer.Option(help="Also hold this many idle authenticated connections", min=0)] = 0,
    idle_processes: Annotated[int, typer.Option(help="Client processes opening the idle ones", min=1)] = 4,
    idle_hold_s: Annotated[float, typer.Option(help="Seconds the idle connections are held", min=1)] = 15,
    out: OutOption = None,
    database_url: Annotated[
        str | None, typer.Option(help="Mercato's database (default: SQLite in the run folder)")
    ] = None,
    find_max: Annotated[
        bool, typer.Option(help="Ramp from --rate (x1.5 a step) to Mercato's maximum, then run at half")
    ] = False,
    broker: Annotated[
        str, typer.Option(help="Mercato's stream + broker backend: sql, redis or nats")
    ] = "sql",
    redis_url: Annotated[
        str | None, typer.Option(help="Redis for --broker redis (default: the settings' default)")
    ] = None,
    nats_url: Annotated[str | None, typer.Option(help="NATS for --broker nats")] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Key / stream-name prefix on the shared broker (default: benchrt<pid>)")
    ] = None,
    port_range: Annotated[
        str | None, typer.Option(help="Loopback ports the servers may take, LOW-HIGH (default: any)")
    ] = None,
    client_processes: Annotated[
        int, typer.Option(help="Load-generator processes the connections are spread over", min=1)
    ] = 1,
    pacing: Annotated[
        str, typer.Option(help="spread: rooms' sends evenly offset; burst: every room at once per interval")
    ] = "spread",
    max_p99_ms: Annotated[
        float | None,
        typer.Option(
            help="--find-max: a step keeps up only with p99 within this (default: 98 % within 2 s only)",
            min=1,
        ),
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--setting",
            help="A MERCATO_* setting for Mercato's server, NAME=VALUE (repeatable), e.g. "
            "MERCATO_REALTIME_OVERLAP_PERSISTER_PASSES=true",
        ),
    ] = None,
) -> None:
    """Chat fan-out over /v1/ws vs a bare `websockets` broadcast server, in the same run; idle
    connections held by one process (`--idle`)."""
    from dataclasses import asdict

    from mercato.bench.servers import server_settings, set_port_range

    if port_range:
        low, _, high = port_range.partition("-")
        set_port_range(int(low), int(high))
    broker_env = {
        "MERCATO_MESSAGING_BACKEND": broker,
        # Its own keys / stream names on a shared Redis or NATS.
        "MERCATO_MESSAGING_BROKER_PREFIX": prefix or f"benchrt{os.getpid()}",
    }
    if redis_url:
        # The stream, the broker, the cache's shared tier and the limiter all on that Redis (its DB).
        broker_env["MERCATO_MESSAGING_REDIS_URL"] = redis_url
        broker_env["MERCATO_RATELIMIT_REDIS_URL"] = redis_url
    if nats_url:
        broker_env["MERCATO_MESSAGING_NATS_URL"] = nats_url
    try:
        broker_env.update(server_settings(setting))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--setting") from exc

    from mercato.bench.realtime import (
        IdleResult,
        realtime_table,
        realtime_verdict,
        run_idle_bench,
        run_realtime_bench,
    )

    folder = RunFolder.open("bench-realtime", out)
    load_before = os.getloadavg()
    results = (
        run_realtime_bench(
            connections=connections,
            rooms=rooms,
            rate=rate,
            seconds=seconds,
            workdir=folder.path,
            database_url=database_url,
            find_max=find_max,
            settings_env=broker_env,
            client_processes=client_processes,
            pacing=pacing,
            max_p99_ms=max_p99_ms,
        )
        if connections
        else []
    )
    idle_result: IdleResult | None = None
    if idle:
        idle_result = run_idle_bench(
            connections=idle, processes=idle_processes, hold_s=idle_hold_s, workdir=folder.path
        )
    load_after = os.getloadavg()
    title = (
        f"{connections} connections, {rooms} rooms, {rate:g} msgs/s offered, {seconds:g} s, "
        f"{client_processes} client process(es), {pacing} pacing"
    )
    tables = realtime_table(results, idle_result, title=title)
    lines = [
        f"load average before {load_before[0]:.1f} after {load_after[0]:.1f} (2 cores, shared)",
        *realtime_verdict(results, idle_result, max_p99_ms=max_p99_ms),
    ]
    console = Console(width=180)
    for table in tables:
        console.print(table)
    console.print("\n".join(lines))
    folder.record(
        data={
            "results": [asdict(r) for r in results],
            "idle": asdict(idle_result) if idle_result else None,
            "load_average": [load_before, load_after],
        },
        tables=tables,
        verdict=lines,
        console=Console(stderr=True),
    )


@app.command("streams")
def streams(
    backends: Annotated[
        str, typer.Option(help="Comma-separated: redis,nats,sqlite,postgresql (the SQL log)")
    ] = "redis,nats,sqlite,postgresql",
    messages: Annotated[int, typer.Option(help="Messages per run", min=100)] = 5000,
    batch: Annotated[int, typer.Option(help="Publish and read batch size", min=1)] = 100,
    redis_url: Annotated[str, typer.Option(help="Redis server")] = "redis://127.0.0.1:6379/0",
    nats_url: Annotated[str, typer.Option(help="NATS server")] = "nats://127.0.0.1:4222",
    out: OutOption = None,
) -> None:
    """Publish+consume msgs/s through our `Stream` adapters vs the raw client (goal: >= 70% of raw)."""
    import asyncio

    from mercato.bench.streams import run_streams_bench

    results = asyncio.run(
        run_streams_bench(
            backends=[b.strip() for b in backends.split(",") if b.strip()],
            messages=messages,
            batch_size=batch,
            redis_url=redis_url,
            nats_url=nats_url,
        )
    )
    table = Table(title=f"Publish+consume, {messages} messages, batch {batch}, ack per message")
    for column in ("backend", "ours msgs/s", "raw msgs/s", "ours/raw"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in results:
        table.add_row(
            r.backend,
            f"{r.ours_per_s:,.0f}",
            "—" if r.raw_per_s is None else f"{r.raw_per_s:,.0f}",
            "—" if r.ratio is None else f"{r.ratio:.0%}",
        )
    Console().print(table)
    data = {
        "messages": messages,
        "batch": batch,
        "results": [
            {
                "backend": r.backend,
                "ours_per_s": r.ours_per_s,
                "raw_per_s": r.raw_per_s,
                "ratio": None if r.ratio is None else round(r.ratio, 3),
            }
            for r in results
        ],
    }
    RunFolder.open("bench-streams", out).record(data=data, tables=[table], console=console)


@app.command("idle")
def idle(
    seconds: Annotated[float, typer.Option(help="Idle seconds measured", min=5)] = 30.0,
    settle: Annotated[float, typer.Option(help="Seconds after /readyz before measuring", min=0)] = 10.0,
    database_url: Annotated[
        str | None, typer.Option(help="PostgreSQL to run on (default: a fresh SQLite file)")
    ] = None,
    max_core_share: Annotated[
        float, typer.Option(help="Exit 1 if the idle process used more than this share of a core")
    ] = 0.01,
    out: OutOption = None,
) -> None:
    """CPU an idle `mercato up` uses (its own process, /proc CPU time; goal <= 1 % of a core)."""
    from mercato.bench.idle import measure_idle

    result = measure_idle(seconds=seconds, settle_s=settle, database_url=database_url)
    table = Table(title=f"Idle `mercato up` ({result.database}), {seconds:.0f} s")
    for column in ("CPU seconds", "share of a core", "load average before", "load average after"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{result.cpu_s:.2f}",
        f"{result.core_share:.2%}",
        " ".join(f"{x:.2f}" for x in result.load_before),
        " ".join(f"{x:.2f}" for x in result.load_after),
    )
    Console().print(table)
    held = result.core_share <= max_core_share
    verdict = [
        f"idle cost {result.core_share:.2%} of a core vs goal <= {max_core_share:.0%}: "
        + ("held" if held else "did not hold")
    ]
    data = {
        "database": result.database,
        "seconds": seconds,
        "cpu_s": round(result.cpu_s, 3),
        "core_share": round(result.core_share, 4),
        "load_before": result.load_before,
        "load_after": result.load_after,
    }
    RunFolder.open("bench-idle", out).record(data=data, tables=[table], verdict=verdict, console=console)
    console.print(verdict[0])
    if not held:
        raise typer.Exit(1)
