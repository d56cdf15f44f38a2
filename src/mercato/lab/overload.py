"""`mercato lab overload`: does load shedding keep an overloaded API useful?

Hypothesis (guide §18, §33): offered twice its capacity, a server that queues everything lets every
request's latency grow until clients time out, so goodput (2xx answered in time) collapses; a server
that refuses the excess at once with 503 keeps the latency of the requests it admits bounded and its
goodput near capacity.

Run: one SQLite catalog, seeded; `mercato api` started with shedding OFF. The bench's rate search
finds the capacity of `GET /v1/products/{id}` (highest rate with p99 < SLO, no errors). Then the same
open-loop generator offers `factor x capacity` for `duration_s` to the server with shedding OFF,
and again to a fresh server with shedding ON. Reported per run: goodput (2xx/s), p99 of the admitted
(2xx) requests measured from their intended send time (so client-side queueing counts), the shed rate
(503/s and share of offered), and timeouts (no answer within the client's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from mercato.bench.client import ALLOWED_HOST, GeneratorConfig, GeneratorResult, OpenLoopGenerator
from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.bench.runner import Bench, BenchOptions, Target, machine_facts
from mercato.bench.search import SearchPolicy
from mercato.bench.servers import (
    ServerProcess,
    database,
    free_port,
    migrate_and_seed,
    product_paths,
    start_server,
)
from mercato.bench.stats import Counts, LatencyHistogram, Slo, achieved_rate
from mercato.bench.timetable import total_requests

__all__ = ["OverloadOptions", "OverloadReport", "overload_command", "plot_report", "run_overload"]


@dataclass(frozen=True)
class OverloadOptions:
    duration_s: float = 8.0
    rounds: int = 2
    factor: float = 2.0
    capacity: float | None = None  # skip the search and use this rate as capacity
    search_step_s: float = 3.0
    slo_p99_ms: float = 50.0
    max_inflight: int = 64
    max_connections: int = 256
    timeout_s: float = 2.0
    products: int = 1200
    database_url: str | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.duration_s <= 0 or self.factor <= 0 or self.search_step_s <= 0:
            raise ValueError("duration_s, factor and search_step_s must be positive")
        if self.capacity is not None and self.capacity <= 0:
            raise ValueError("capacity must be positive")


@dataclass
class OverloadRun:
    shedding: bool
    offered_rate: float
    span_s: float
    counts: Counts
    shed: int
    admitted: LatencyHistogram
    timeline: dict[int, list[int]]  # second -> [ok, shed, failed]
    server_cpu: float | None = None

    @property
    def goodput(self) -> float:
        c = self.counts
        return achieved_rate(
            ok=c.ok, span_s=self.span_s, first_due_s=c.first_due_s, last_done_s=c.last_done_s
        )

    @property
    def admitted_p99_ms(self) -> float:
        return self.admitted.percentile_ms(99) if self.admitted.count else float("nan")

    @property
    def admitted_p50_ms(self) -> float:
        return self.admitted.percentile_ms(50) if self.admitted.count else float("nan")

    @property
    def shed_rate(self) -> float:
        return self.shed / self.span_s

    @property
    def shed_share(self) -> float:
        return self.shed / self.counts.scheduled if self.counts.scheduled else 0.0

    @property
    def failed(self) -> int:
        c = self.counts
        return c.timeouts + c.transport_errors + (c.non_2xx - self.shed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shedding": self.shedding,
            "offered_rate": round(self.offered_rate, 1),
            "goodput": round(self.goodput, 1),
            "admitted_p50_ms": round(self.admitted_p50_ms, 2),
            "admitted_p99_ms": round(self.admitted_p99_ms, 2),
            "shed_per_s": round(self.shed_rate, 1),
            "shed_share": round(self.shed_share, 4),
            "timeouts": self.counts.timeouts,
            "other_failures": self.failed - self.counts.timeouts,
            "scheduled": self.counts.scheduled,
            "ok": self.counts.ok,
            "server_cpu": None if self.server_cpu is None else round(self.server_cpu, 3),
        }


@dataclass
class OverloadReport:
    options: OverloadOptions
    machine: dict[str, Any]
    capacity: float
    capacity_p99_ms: float | None
    runs: list[OverloadRun] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "endpoint": "GET /v1/products/{id}",
            "capacity": round(self.capacity, 1),
            "capacity_p99_ms": self.capacity_p99_ms,
            "capacity_slo_p99_ms": self.options.slo_p99_ms,
            "offered_rate": round(self.capacity * self.options.factor, 1),
            "duration_s": self.options.duration_s,
            "rounds": self.options.rounds,
            "max_inflight": self.options.max_inflight,
            "client_timeout_s": self.options.timeout_s,
            "runs": [run.to_dict() for run in self.runs],
        }


# -- the generator, split by outcome ----------------------------------------------------------------


class _OutcomeGenerator(OpenLoopGenerator):
    """The bench's open-loop generator, also keeping a histogram of 2xx only and a per-second timeline."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(config)
        self.admitted = LatencyHistogram()
        self.shed = 0
        self.timeline: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])

    def _second(self, now_s: float) -> int:
        return int(now_s - self.config.t0_s)

    def _responded(self, conn: Any, status: int, keep_alive: bool) -> None:
        now = time.monotonic()
        if 200 <= status < 300:
            self.admitted.record_s(now - conn.intended_s)
            self.timeline[self._second(now)][0] += 1
        elif status == 503:
            self.shed += 1
            self.timeline[self._second(now)][1] += 1
        else:
            self.timeline[self._second(now)][2] += 1
        super()._responded(conn, status, keep_alive)

    def _finish_error(self, intended_s: float, *, transport: bool) -> None:
        self.timeline[self._second(time.monotonic())][2] += 1
        super()._finish_error(intended_s, transport=transport)


def run_outcome_generator(config: GeneratorConfig) -> dict[str, Any]:
    """Process entry point (picklable): one overload step, results split by outcome."""

    async def _go() -> dict[str, Any]:
        gen = _OutcomeGenerator(config)
        result = await gen.run()
        return {
            **result.to_dict(),
            "admitted": gen.admitted.encode(),
            "shed": gen.shed,
            "timeline": {str(k): v for k, v in gen.timeline.items()},
        }

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        return asyncio.run(_go())
    return uvloop.run(_go())


# -- the run ----------------------------------------------------------------------------------------


def _server_env(*, database_url: str, workdir: Path, shedding: bool, max_inflight: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MERCATO_")}
    env.update(
        {
            "MERCATO_DATABASE_URL": database_url,
            "MERCATO_DATA_DIR": str(workdir),
            "MERCATO_BACKPRESSURE_ENABLED": "true" if shedding else "false",
            "MERCATO_BACKPRESSURE_MAX_INFLIGHT": str(max_inflight),
            # One client address sends everything: the per-client rate limiter would answer 429s
            # and hide what the shedder does. Only the shedder is under test here.
            "MERCATO_RATELIMIT_ENABLED": "false",
        }
    )
    return env


def _start(*, database_url: str, workdir: Path, shedding: bool, max_inflight: int) -> ServerProcess:
    port = free_port()
    args = ["-m", "mercato.cli.main", "api", "--host", ALLOWED_HOST, "--port", str(port), "--workers", "1"]
    env = _server_env(
        database_url=database_url, workdir=workdir, shedding=shedding, max_inflight=max_inflight
    )
    name = "mercato-shedding-" + ("on" if shedding else "off")
    return start_server(name, args, port=port, workdir=workdir, env=env, ready_path="/startupz")


async def _drive(
    executor: ProcessPoolExecutor,
    server: ServerProcess,
    paths: tuple[str, ...],
    *,
    rate: float,
    options: OverloadOptions,
    shedding: bool,
) -> OverloadRun:
    loop = asyncio.get_running_loop()
    config = GeneratorConfig(
        port=server.port,
        paths=paths,
        rate_per_s=rate,
        duration_s=options.duration_s,
        t0_s=time.monotonic() + 0.25,
        max_connections=options.max_connections,
        warm_connections=min(16, options.max_connections),
        timeout_s=options.timeout_s,
    )
    cpu0, wall0 = server.cpu_s(), time.monotonic()
    raw = await loop.run_in_executor(executor, run_outcome_generator, config)
    cpu1, wall = server.cpu_s(), time.monotonic() - wall0
    result = GeneratorResult.from_dict(raw)
    admitted = LatencyHistogram()
    admitted.add_encoded(raw["admitted"])
    return OverloadRun(
        shedding=shedding,
        offered_rate=rate,
        span_s=total_requests(rate_per_s=rate, duration_s=options.duration_s) / rate,
        counts=result.counts,
        shed=int(raw["shed"]),
        admitted=admitted,
        timeline={int(k): list(v) for k, v in raw["timeline"].items()},
        server_cpu=None if cpu0 is None or cpu1 is None or wall <= 0 else (cpu1 - cpu0) / wall,
    )


def run_overload(options: OverloadOptions, *, on_phase: Any = print) -> OverloadReport:
    """Both servers run side by side and are driven in alternation, `rounds` times each, so that
    background load on a shared machine falls on both configurations alike."""
    machine = machine_facts()
    with tempfile.TemporaryDirectory(prefix="mercato-overload-") as tmp:
        workdir = Path(tmp)
        with database(options.database_url, workdir, create=False) as url, _spawn_executor() as executor:
            on_phase("migrating and seeding the demo catalog")
            migrate_and_seed(url, workdir, products=options.products)
            servers: dict[bool, ServerProcess] = {}
            try:
                for shedding in (False, True):
                    servers[shedding] = _start(
                        database_url=url,
                        workdir=workdir,
                        shedding=shedding,
                        max_inflight=options.max_inflight,
                    )
                paths = tuple(product_paths(servers[False].base_url, sample=500))
                target = Target("product-by-id", "GET /v1/products/{id}", "mercato", paths)
                capacity, capacity_p99 = options.capacity, None
                if capacity is None:
                    on_phase("searching the capacity of GET /v1/products/{id} (shedding off)")
                    capacity, capacity_p99 = _search_capacity(executor, servers[False], target, options)
                    on_phase(f"capacity: {capacity:,.0f}/s")
                bench = Bench(_bench_options(options), executor)
                for server in servers.values():  # same warm-up for both (pools, SQLite page cache)
                    asyncio.run(bench.step(target, server, min(capacity, 500.0), 2.0))
                rate = capacity * options.factor
                parts: dict[bool, list[OverloadRun]] = {False: [], True: []}
                for number in range(options.rounds):
                    for shedding in (False, True):
                        state = "on" if shedding else "off"
                        on_phase(
                            f"round {number + 1}/{options.rounds}: {rate:,.0f}/s for "
                            f"{options.duration_s:g} s, shedding {state}"
                        )
                        time.sleep(1.0)
                        parts[shedding].append(
                            asyncio.run(
                                _drive(
                                    executor,
                                    servers[shedding],
                                    paths,
                                    rate=rate,
                                    options=options,
                                    shedding=shedding,
                                )
                            )
                        )
            finally:
                for server in servers.values():
                    server.stop()
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = os.getloadavg()
    runs = [_combine(parts[False], options), _combine(parts[True], options)]
    return OverloadReport(
        options=options, machine=machine, capacity=capacity, capacity_p99_ms=capacity_p99, runs=runs
    )


def _combine(rounds: list[OverloadRun], options: OverloadOptions) -> OverloadRun:
    """One run from several rounds: counts and histograms merged, timelines laid end to end."""
    counts = Counts()
    admitted = LatencyHistogram()
    timeline: dict[int, list[int]] = {}
    server_cpu: list[float] = []
    for number, item in enumerate(rounds):
        # Rounds are separate in time: merge as if each started where the previous one ended.
        shifted = Counts(
            **{
                **item.counts.to_dict(),
                "first_due_s": 0.0,
                "last_done_s": max(item.span_s, item.counts.last_done_s - item.counts.first_due_s),
            }
        )
        counts = _add(counts, shifted)
        admitted.add_encoded(item.admitted.encode())
        offset = number * int(options.duration_s + options.timeout_s + 1)
        for second, values in item.timeline.items():
            timeline[offset + second] = values
        if item.server_cpu is not None:
            server_cpu.append(item.server_cpu)
    span = sum(r.span_s for r in rounds)
    counts.first_due_s = 0.0
    counts.last_done_s = sum(max(r.span_s, r.counts.last_done_s - r.counts.first_due_s) for r in rounds)
    return OverloadRun(
        shedding=rounds[0].shedding,
        offered_rate=rounds[0].offered_rate,
        span_s=span,
        counts=counts,
        shed=sum(r.shed for r in rounds),
        admitted=admitted,
        timeline=timeline,
        server_cpu=sum(server_cpu) / len(server_cpu) if server_cpu else None,
    )


def _add(total: Counts, item: Counts) -> Counts:
    merged = total.merge(item)
    merged.wall_s = total.wall_s + item.wall_s
    return merged


def _spawn_executor() -> ProcessPoolExecutor:
    # One generator process, started fresh (spawn): it must not inherit this process's event loop.
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def _bench_options(options: OverloadOptions) -> BenchOptions:
    return BenchOptions(
        duration_s=options.search_step_s,
        warmup_s=2.0,
        pause_s=0.5,
        policy=SearchPolicy(start_rate=250.0, growth=2.0, precision=0.08, max_steps=10),
        slo=Slo(p99_ms=options.slo_p99_ms),
        max_connections=options.max_connections,
        timeout_s=options.timeout_s,
    )


def _search_capacity(
    executor: ProcessPoolExecutor, server: ServerProcess, target: Target, options: OverloadOptions
) -> tuple[float, float | None]:
    bench = Bench(_bench_options(options), executor)
    report = asyncio.run(bench.search(target, server, lambda *_: None))
    if report.best_rate is None:
        raise RuntimeError("no rate met the SLO: the machine is too busy to measure a capacity")
    best = report.best_step
    return report.best_rate, (round(best.p99_ms, 2) if best else None)


# -- output -----------------------------------------------------------------------------------------


def plot_report(report: OverloadReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(11, 7), constrained_layout=True)
    grid = fig.add_gridspec(2, 3)
    timeline = fig.add_subplot(grid[0, :])
    colours = {False: "#c0392b", True: "#2471a3"}
    labels = {False: "shedding OFF", True: "shedding ON"}
    for run in report.runs:
        seconds = sorted(s for s in run.timeline if s >= 0)
        timeline.plot(
            seconds,
            [run.timeline[s][0] for s in seconds],
            color=colours[run.shedding],
            label=f"{labels[run.shedding]}: 2xx/s",
        )
        if run.shedding:
            timeline.plot(
                seconds,
                [run.timeline[s][1] for s in seconds],
                color=colours[True],
                linestyle=":",
                label="shedding ON: 503/s",
            )
    timeline.axhline(
        report.capacity, color="grey", linestyle="--", label=f"capacity {report.capacity:,.0f}/s"
    )
    timeline.set_xlabel("second (rounds laid end to end)")
    timeline.set_ylabel("responses per second")
    offered = report.capacity * report.options.factor
    timeline.set_title(
        f"GET /v1/products/{{id}} offered {offered:,.0f}/s ({report.options.factor:g}x capacity)"
    )
    timeline.legend(loc="upper right", fontsize=8)

    names = [labels[r.shedding] for r in report.runs]
    bar_colours = [colours[r.shedding] for r in report.runs]
    panels = (
        ("goodput (2xx/s)", [r.goodput for r in report.runs], "{:,.0f}"),
        ("p99 of admitted (ms)", [r.admitted_p99_ms for r in report.runs], "{:,.1f}"),
        ("shed (503) share of offered", [100 * r.shed_share for r in report.runs], "{:.0f} %"),
    )
    for column, (title, values, fmt) in enumerate(panels):
        axis = fig.add_subplot(grid[1, column])
        bars = axis.bar(names, values, color=bar_colours)
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(
                fmt.format(value),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        axis.set_title(title, fontsize=10)
        if column == 0:
            axis.axhline(report.capacity, color="grey", linestyle="--")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(report: OverloadReport) -> Any:
    from rich.table import Table

    table = Table(
        title=f"GET /v1/products/{{id}} at {report.options.factor:g}x capacity "
        f"({report.capacity:,.0f}/s -> {report.capacity * report.options.factor:,.0f}/s offered)"
    )
    for column in (
        "shedding",
        "goodput 2xx/s",
        "admitted p50 ms",
        "admitted p99 ms",
        "shed/s",
        "shed %",
        "timeouts",
        "server CPU",
    ):
        table.add_column(column, justify="right")
    for run in report.runs:
        table.add_row(
            "on" if run.shedding else "off",
            f"{run.goodput:,.0f}",
            f"{run.admitted_p50_ms:,.1f}",
            f"{run.admitted_p99_ms:,.1f}",
            f"{run.shed_rate:,.0f}",
            f"{100 * run.shed_share:.1f}",
            f"{run.counts.timeouts:,}",
            "—" if run.server_cpu is None else f"{run.server_cpu:.0%}",
        )
    return table


def _verdict(report: OverloadReport) -> list[str]:
    """Per round, what shedding did to goodput and to the admitted requests' p99."""
    return [
        f"shedding {'on' if run.shedding else 'off'}: goodput {run.goodput:,.0f}/s, admitted p99 "
        f"{run.admitted_p99_ms:,.1f} ms, shed {100 * run.shed_share:.1f} %, timeouts {run.counts.timeouts:,}"
        for run in report.runs
    ]


def overload_command(
    duration_s: Annotated[float, typer.Option("--duration-s", help="Seconds of overload per round")] = 8.0,
    rounds: Annotated[int, typer.Option(help="Alternating OFF/ON rounds (shared-machine noise)")] = 2,
    factor: Annotated[float, typer.Option(help="Offered load as a multiple of capacity")] = 2.0,
    capacity: Annotated[
        float | None, typer.Option(help="Skip the rate search and take this as capacity (req/s)")
    ] = None,
    slo_p99_ms: Annotated[
        float, typer.Option("--slo-p99-ms", help="Capacity = highest rate with p99 below")
    ] = 50.0,
    max_inflight: Annotated[int, typer.Option("--max-inflight", help="Shedder's in-flight limit")] = 64,
    database_url: Annotated[str | None, typer.Option(help="Default: a fresh SQLite file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Offer 2x capacity with load shedding off and on: goodput, admitted p99, shed rate."""
    import orjson
    from rich.console import Console

    console = Console(stderr=True)
    try:
        options = OverloadOptions(
            duration_s=duration_s,
            rounds=rounds,
            factor=factor,
            capacity=capacity,
            slo_p99_ms=slo_p99_ms,
            max_inflight=max_inflight,
            database_url=database_url,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if update_docs:
        check_docs_target("overload")
    report = run_overload(options, on_phase=console.print)
    run = RunFolder.open("overload", out)
    written = plot_report(report, run.figure)
    if as_json:
        typer.echo(
            orjson.dumps({**report.to_dict(), "plot": str(written)}, option=orjson.OPT_INDENT_2).decode()
        )
    else:
        Console().print(_table(report))
    run.record(
        data=report.to_dict(),
        tables=[_table(report)],
        verdict=_verdict(report),
        update_docs=update_docs,
        console=console,
    )
