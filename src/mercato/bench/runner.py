"""The benchmark run: servers up, a rate search per target, a report.

Targets are measured back to back in one run (baseline first), each from a warm-up step, so the
ratio of each target's maximum sustainable rate to the baseline's compares figures taken minutes
apart on the same machine under the same background load.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercato.bench.client import GeneratorConfig, GeneratorResult, merge_results, run_generator
from mercato.bench.search import RateSearch, SearchPolicy
from mercato.bench.servers import (
    ServerProcess,
    body_size,
    category_paths,
    database,
    migrate_and_seed,
    product_paths,
    start_baseline,
    start_mercato,
)
from mercato.bench.stats import Slo, StepResult, ratio
from mercato.bench.timetable import total_requests

BASELINE = "bare"
# On PostgreSQL: bare Starlette + raw asyncpg doing product-by-id's SELECT (issue 16's floor).
RAW_DB = "raw-asyncpg-by-id"
TARGETS = ("product-by-id", "product-list", "category-page")


@dataclass(frozen=True)
class Target:
    name: str
    endpoint: str  # what the table shows
    server: str  # "baseline" | "mercato"
    paths: tuple[str, ...]


@dataclass(frozen=True)
class BenchOptions:
    duration_s: float = 5.0
    warmup_s: float = 2.0
    pause_s: float = 1.0
    policy: SearchPolicy = field(default_factory=SearchPolicy)
    rates: tuple[float, ...] | None = None
    slo: Slo = field(default_factory=Slo)
    workers: int = 1
    generators: int = 1
    max_connections: int = 256
    timeout_s: float = 2.0
    lag_threshold_s: float = 0.005
    database_url: str | None = None
    create_database: bool = False
    products: int = 1200
    id_sample: int = 500
    targets: tuple[str, ...] = TARGETS
    baseline_kind: str = "starlette"
    # False: Mercato's application cache off (MERCATO_CACHE_ENABLED=false), every read hits the DB.
    app_cache: bool = True


@dataclass
class TargetReport:
    target: Target
    steps: list[StepResult] = field(default_factory=list)
    best_rate: float | None = None

    @property
    def best_step(self) -> StepResult | None:
        for step in self.steps:
            if step.offered_rate == self.best_rate:
                return step
        return None


@dataclass
class BenchReport:
    options: BenchOptions
    machine: dict[str, Any]
    database: str
    body_bytes: dict[str, int]
    targets: list[TargetReport]

    @property
    def baseline(self) -> TargetReport:
        return next(t for t in self.targets if t.target.name == BASELINE)

    def ratio(self, report: TargetReport) -> float | None:
        return ratio(report.best_rate, self.baseline.best_rate)

    @property
    def raw_db(self) -> TargetReport | None:
        return next((t for t in self.targets if t.target.name == RAW_DB), None)

    def ratio_vs_raw(self, report: TargetReport) -> float | None:
        raw = self.raw_db
        return None if raw is None else ratio(report.best_rate, raw.best_rate)

    @property
    def complete(self) -> bool:
        """Every target (the baseline included) found a sustainable rate."""
        return all(t.best_rate is not None for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        opts = self.options
        return {
            "machine": self.machine,
            "database": self.database,
            "body_bytes": self.body_bytes,
            "settings": {
                "duration_s": opts.duration_s,
                "warmup_s": opts.warmup_s,
                "workers": opts.workers,
                "generators": opts.generators,
                "max_connections": opts.max_connections,
                "timeout_s": opts.timeout_s,
                "baseline": opts.baseline_kind,
                "app_cache": opts.app_cache,
                "slo": {
                    "p99_ms_below": opts.slo.p99_ms,
                    "max_errors": opts.slo.max_errors,
                    "min_achieved_fraction": opts.slo.min_achieved_fraction,
                },
            },
            "results": [
                {
                    "target": t.target.name,
                    "endpoint": t.target.endpoint,
                    "max_sustainable_rate": t.best_rate,
                    "ratio_vs_bare": self.ratio(t),
                    "ratio_vs_raw_asyncpg": self.ratio_vs_raw(t),
                    "at_max": t.best_step.to_dict() if t.best_step else None,
                    "steps": [{**s.to_dict(), "passed": not s.notes, "violations": s.notes} for s in t.steps],
                }
                for t in self.targets
            ],
        }


def machine_facts() -> dict[str, Any]:
    load: tuple[float, float, float] | None
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        load = None
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_at_start": load,
    }


# Progress callback: (target, step number, rate, result or None while running).
ProgressHook = Callable[[str, int, float, StepResult | None], None]


class Bench:
    """Drives generator processes against running servers."""

    def __init__(self, options: BenchOptions, executor: ProcessPoolExecutor) -> None:
        self.options = options
        self.executor = executor

    async def step(self, target: Target, server: ServerProcess, rate: float, duration_s: float) -> StepResult:
        opts = self.options
        n = opts.generators
        loop = asyncio.get_running_loop()
        t0 = time.monotonic() + 0.25  # time for the workers to open their warm connections
        configs = [
            GeneratorConfig(
                port=server.port,
                paths=target.paths,
                rate_per_s=rate,
                duration_s=duration_s,
                t0_s=t0,
                processes=n,
                index=k,
                max_connections=max(1, opts.max_connections // n),
                warm_connections=min(16, max(1, opts.max_connections // n)),
                timeout_s=opts.timeout_s,
                lag_threshold_s=opts.lag_threshold_s,
            )
            for k in range(n)
        ]
        cpu_before, wall_before = server.cpu_s(), time.monotonic()
        raw = await asyncio.gather(*(loop.run_in_executor(self.executor, run_generator, c) for c in configs))
        cpu_after, wall = server.cpu_s(), time.monotonic() - wall_before
        counts, histogram = merge_results([GeneratorResult.from_dict(r) for r in raw])
        server_cpu = server_cpu_s = None
        if cpu_before is not None and cpu_after is not None and wall > 0:
            server_cpu_s = cpu_after - cpu_before
            server_cpu = server_cpu_s / wall
        result = StepResult(
            target=target.name,
            offered_rate=rate,
            span_s=total_requests(rate_per_s=rate, duration_s=duration_s) / rate,
            counts=counts,
            histogram=histogram,
            server_cpu=server_cpu,
            server_cpu_s=server_cpu_s,
        )
        result.notes = opts.slo.violations(result)
        return result

    async def search(self, target: Target, server: ServerProcess, on_step: ProgressHook) -> TargetReport:
        opts = self.options
        report = TargetReport(target=target)
        if opts.warmup_s > 0:
            on_step(target.name, 0, opts.policy.start_rate, None)
            await self.step(target, server, min(opts.policy.start_rate, 200.0), opts.warmup_s)
            await asyncio.sleep(opts.pause_s)
        search = RateSearch(policy=opts.policy, rates=opts.rates)
        number = 0
        while (rate := search.next_rate()) is not None:
            number += 1
            on_step(target.name, number, rate, None)
            result = await self.step(target, server, rate, opts.duration_s)
            search.record(rate, not result.notes)
            report.steps.append(result)
            on_step(target.name, number, rate, result)
            await asyncio.sleep(opts.pause_s)
        report.best_rate = search.best
        return report


def _executor(generators: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=generators, mp_context=multiprocessing.get_context("spawn"))


def run_http_bench(
    options: BenchOptions,
    *,
    on_phase: Callable[[str], None] = lambda _msg: None,
    on_step: ProgressHook = lambda *_args: None,
) -> BenchReport:
    """Prepare the database, start both servers, search each target's maximum rate, stop everything."""
    machine = machine_facts()
    with tempfile.TemporaryDirectory(prefix="mercato-bench-") as tmp:
        workdir = Path(tmp)
        with database(options.database_url, workdir, create=options.create_database) as url:
            on_phase("migrating and seeding the demo catalog")
            migrate_and_seed(url, workdir, products=options.products)
            servers: list[ServerProcess] = []
            try:
                on_phase("starting the servers")
                # One load generator is one anonymous address: the `anonymous-ip` rule would answer
                # most of the run with 429 (the limiter's own cost is `mercato bench ratelimit`'s).
                mercato = start_mercato(
                    database_url=url,
                    workdir=workdir,
                    workers=options.workers,
                    settings_env={
                        "MERCATO_RATELIMIT_ENABLED": "false",
                        "MERCATO_CACHE_ENABLED": "true" if options.app_cache else "false",
                    },
                )
                servers.append(mercato)
                baseline = start_baseline(
                    workdir=workdir, workers=options.workers, kind=options.baseline_kind
                )
                servers.append(baseline)
                raw = None
                if url.startswith("postgresql"):
                    raw = start_baseline(
                        workdir=workdir,
                        workers=options.workers,
                        kind="asyncpg",
                        database_url=url,
                        name=RAW_DB,
                    )
                    servers.append(raw)
                from mercato.bench.baseline import BARE_PATH

                by_id = tuple(product_paths(mercato.base_url, sample=options.id_sample))
                categories = tuple(category_paths(mercato.base_url))
                targets = _targets(
                    options.targets, by_id, BARE_PATH, raw_db=raw is not None, categories=categories
                )
                body_bytes = {
                    BASELINE: body_size(baseline.base_url, BARE_PATH),
                    "product-by-id": body_size(mercato.base_url, by_id[0]),
                    "category-page": body_size(mercato.base_url, categories[0]),
                }
                with _executor(options.generators) as executor:
                    bench = Bench(options, executor)
                    reports = []
                    for target in targets:
                        server = {"baseline": baseline, "mercato": mercato, RAW_DB: raw}[target.server]
                        assert server is not None
                        reports.append(asyncio.run(bench.search(target, server, on_step)))
            finally:
                for server in servers:
                    server.stop()
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = os.getloadavg()
    return BenchReport(
        options=options,
        machine=machine,
        database=url.split("://", 1)[0],
        body_bytes=body_bytes,
        targets=reports,
    )


def _targets(
    names: Sequence[str],
    by_id: tuple[str, ...],
    bare_path: str,
    *,
    raw_db: bool = False,
    categories: tuple[str, ...] = (),
) -> list[Target]:
    known = {
        # A category's first page (20 products): from the application cache unless --no-app-cache.
        "category-page": Target("category-page", "GET /v1/products?category={c}", "mercato", categories),
        "product-by-id": Target("product-by-id", "GET /v1/products/{id}", "mercato", by_id),
        "product-list": Target(
            "product-list", "GET /v1/products?limit=20", "mercato", ("/v1/products?limit=20",)
        ),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {sorted(known)}")
    bare = Target(BASELINE, f"GET {bare_path} (bare)", "baseline", (bare_path,))
    raw = (
        [
            Target(
                RAW_DB,
                "GET /raw/products/{id} (Starlette + asyncpg)",
                RAW_DB,
                tuple(path.replace("/v1/products/", "/raw/products/", 1) for path in by_id),
            )
        ]
        if raw_db
        else []
    )
    return [bare, *raw, *(known[n] for n in names)]
