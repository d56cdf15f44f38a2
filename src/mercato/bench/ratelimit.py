"""``mercato bench ratelimit``: what the limiter costs at the edge, and how fast its Redis backend can decide.

1. Overhead. One endpoint served three ways on identical server settings: without a limiter, behind a
   token bucket in process memory, and behind a token bucket in Redis (one EVALSHA per request, through
   the resilient wrapper the gateway uses). The limit is far above any offered rate, so every request is
   admitted and the difference in maximum sustainable rate is the decision's cost. Two endpoints:
   - ``empty`` (the default): the bare Starlette endpoint of ``bench http``, the worst case, where the
     decision is compared with almost nothing. Requests cycle over 1 000 query strings, each its own quota
     key, so Redis sees many keys rather than one hot one.
   - ``product``: the shop's own ``GET /v1/products/{id}`` (``mercato api`` on a seeded SQLite catalog),
     with the limiter switched off (``MERCATO_RATELIMIT_ENABLED=false``) or on with one rule, the real
     gateway middleware (policy file, dimensions, headers) deciding per client address.
   The open-loop generator and the rate search are those of ``mercato bench http``.
2. Decisions per second on Redis, the same token-bucket script: our asyncio client in a tight loop
   (concurrent `hit` calls, as the gateway makes them; and raw pipelined EVALSHA batches), against
   ``redis-benchmark`` sending the same EVALSHA (C client, many connections, optionally pipelined): the
   backend's physical limit on this machine.

``python -m mercato.bench.ratelimit_server --port N --variant bare|memory|redis [--workers W]`` serves one
variant. This module runs the comparison; the servers are in `ratelimit_server`, the decisions/s
measurement in `ratelimit_decisions`, the command and its tables in `ratelimit_cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mercato.bench.baseline import BARE_PATH
from mercato.bench.ratelimit_decisions import DecisionRates, cleanup_keys, measure_decisions
from mercato.bench.ratelimit_server import ENDPOINTS, KEYS, NEVER_LIMITS, VARIANTS, create_app, start_variant
from mercato.bench.runner import (
    BASELINE,
    Bench,
    BenchOptions,
    BenchReport,
    ProgressHook,
    Target,
    TargetReport,
    machine_facts,
)
from mercato.bench.servers import (
    ServerProcess,
    body_size,
    migrate_and_seed,
    product_paths,
    start_mercato,
)

__all__ = [
    "VARIANTS",
    "DecisionRates",
    "RateLimitBenchReport",
    "create_app",
    "measure_decisions",
    "run_ratelimit_bench",
]


# --- the whole run -----------------------------------------------------------------------------------------


@dataclass
class RateLimitBenchReport:
    http: BenchReport | None
    decisions: DecisionRates | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "http": None if self.http is None else self.http.to_dict(),
            "decisions": None if self.decisions is None else self.decisions.to_dict(),
        }


def _targets(endpoint: str = f"GET {BARE_PATH}", paths: tuple[str, ...] | None = None) -> list[Target]:
    paths = paths or tuple(f"{BARE_PATH}?k={i}" for i in range(KEYS))
    return [
        Target(BASELINE, f"{endpoint} (bare)", "bare", paths),
        Target("token-bucket-memory", f"{endpoint} + token bucket, memory", "memory", paths),
        Target("token-bucket-redis", f"{endpoint} + token bucket, Redis", "redis", paths),
    ]


DEFAULT_LADDER = (500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 4000.0, 5000.0, 6000.0, 7000.0, 8000.0)
# GET /v1/products/{id} costs ~2.4 ms of CPU per request on one SQLite worker here (~400/s): steps of
# ~5 % near there, so that a 90 % ratio can be told from 85 %.
PRODUCT_LADDER: tuple[float, ...] = (150.0, 200.0, 250.0, 300.0, 320.0, 340.0, 360.0, 380.0, 400.0)
PRODUCT_LADDER += (420.0, 440.0, 460.0, 480.0, 500.0, 550.0, 600.0, 700.0, 800.0, 1000.0)

# The product variant's one rule: every request to the catalog, per client address, never reached.
_PRODUCT_POLICY = f"""
[defaults]
algorithm = "token_bucket"
fail_open = false  # a benchmark that silently stopped limiting would measure nothing

[[rules]]
name = "bench-catalog"
dimensions = ["ip"]
match = {{ path_prefix = "/v1/products" }}
limit = {{ rate = {NEVER_LIMITS.rate}, period_s = 1, burst = {NEVER_LIMITS.capacity} }}
"""


def _product_settings(variant: str, *, policy_file: Path, redis_url: str, prefix: str) -> dict[str, str]:
    if variant == "bare":
        return {"MERCATO_RATELIMIT_ENABLED": "false"}
    return {
        "MERCATO_RATELIMIT_ENABLED": "true",
        "MERCATO_RATELIMIT_BACKEND": variant,
        "MERCATO_RATELIMIT_POLICY_FILE": str(policy_file),
        "MERCATO_RATELIMIT_REDIS_URL": redis_url,
        "MERCATO_RATELIMIT_KEY_PREFIX": prefix,
        # As for the empty endpoint: capacity is measured, not the production 100 ms socket timeout.
        "MERCATO_RATELIMIT_SOCKET_TIMEOUT_S": "1.0",
        "MERCATO_RATELIMIT_TIMEOUT_S": "2.0",
    }


async def _interleaved(
    bench: Bench, targets: list[Target], servers: dict[str, ServerProcess], on_step: ProgressHook
) -> list[TargetReport]:
    """Every variant at each rate of the ladder in turn, before the next rate.

    On a shared machine the background load drifts over minutes; measuring the variants one after
    another would hand that drift to whichever ran in the bad minute. Interleaved, all three see the same
    minute at each rate (and the order rotates per rate). A failed rate is measured a second time before
    it counts; a variant stops after two failed rates in a row; its maximum is the highest rate that passed.
    """
    opts = bench.options
    reports = {t.name: TargetReport(target=t) for t in targets}
    failures = dict.fromkeys(reports, 0)
    for target in targets:
        if opts.warmup_s > 0:
            on_step(target.name, 0, opts.policy.start_rate, None)
            await bench.step(
                target, servers[target.server], min(opts.policy.start_rate, 200.0), opts.warmup_s
            )
    ladder = sorted(opts.rates or DEFAULT_LADDER)
    for number, rate in enumerate(ladder, start=1):
        order = targets[number % len(targets) :] + targets[: number % len(targets)]
        for target in order:
            report = reports[target.name]
            if failures[target.name] >= 2:
                continue
            on_step(target.name, number, rate, None)
            result = await bench.step(target, servers[target.server], rate, opts.duration_s)
            report.steps.append(result)
            on_step(target.name, number, rate, result)
            if result.notes:
                # Re-measured once before it counts: on a shared machine one neighbour's burst can
                # spike a 3-second step's p99, and that is not this variant's capacity.
                await asyncio.sleep(opts.pause_s)
                result = await bench.step(target, servers[target.server], rate, opts.duration_s)
                report.steps.append(result)
                on_step(target.name, number, rate, result)
            if result.notes:
                failures[target.name] += 1
            else:
                failures[target.name] = 0
                report.best_rate = max(rate, report.best_rate or 0.0)
            await asyncio.sleep(opts.pause_s)
        if all(count >= 2 for count in failures.values()):
            break
    return [reports[t.name] for t in targets]


def run_overhead_bench(
    options: BenchOptions,
    *,
    redis_url: str,
    endpoint: str = "empty",
    on_phase: Callable[[str], None] = lambda _msg: None,
    on_step: ProgressHook = lambda *_args: None,
) -> BenchReport:
    """Start the three variants, measure them interleaved on one rate ladder, stop them."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; choose from {ENDPOINTS}")
    machine = machine_facts()
    prefix = f"mercato:bench:rl:{uuid.uuid4().hex[:12]}:"
    servers: dict[str, ServerProcess] = {}
    database = "none"
    try:
        with tempfile.TemporaryDirectory(prefix="mercato-bench-rl-") as tmp:
            workdir = Path(tmp)
            if endpoint == "empty":
                on_phase("starting the three variants")
                for variant in VARIANTS:
                    servers[variant] = start_variant(
                        variant, workdir=workdir, workers=options.workers, redis_url=redis_url, prefix=prefix
                    )
                targets, body = _targets(), body_size(servers["bare"].base_url, BARE_PATH)
            else:
                targets, body = _start_product_variants(
                    servers, options, workdir=workdir, redis_url=redis_url, prefix=prefix, on_phase=on_phase
                )
                database = "sqlite"
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=options.generators, mp_context=context) as executor:
                bench = Bench(options, executor)
                reports = asyncio.run(_interleaved(bench, targets, servers, on_step))
    finally:
        for server in servers.values():
            server.stop()
        asyncio.run(cleanup_keys(redis_url, prefix))
    with contextlib.suppress(OSError):
        machine["loadavg_at_end"] = os.getloadavg()
    return BenchReport(
        options=options, machine=machine, database=database, body_bytes={BASELINE: body}, targets=reports
    )


def _start_product_variants(
    servers: dict[str, ServerProcess],
    options: BenchOptions,
    *,
    workdir: Path,
    redis_url: str,
    prefix: str,
    on_phase: Callable[[str], None],
) -> tuple[list[Target], int]:
    """Three `mercato api` processes on one seeded SQLite catalog (read only while measured)."""
    url = f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    on_phase("migrating and seeding the demo catalog")
    migrate_and_seed(url, workdir, products=options.products)
    policy_file = workdir / "ratelimit.toml"
    policy_file.write_text(_PRODUCT_POLICY, encoding="utf-8")
    on_phase("starting the three variants")
    for variant in VARIANTS:
        settings = _product_settings(variant, policy_file=policy_file, redis_url=redis_url, prefix=prefix)
        servers[variant] = start_mercato(
            database_url=url,
            workdir=workdir,
            workers=options.workers,
            name=f"mercato-{variant}",
            settings_env=settings,
        )
    paths = tuple(product_paths(servers["bare"].base_url, sample=options.id_sample))
    return _targets("GET /v1/products/{id}", paths), body_size(servers["bare"].base_url, paths[0])


def run_ratelimit_bench(
    options: BenchOptions,
    *,
    redis_url: str,
    http: bool = True,
    decisions: bool = True,
    decision_seconds: float = 5.0,
    endpoint: str = "empty",
    on_phase: Callable[[str], None] = lambda _msg: None,
    on_step: ProgressHook = lambda *_args: None,
) -> RateLimitBenchReport:
    overhead = (
        run_overhead_bench(
            options, redis_url=redis_url, endpoint=endpoint, on_phase=on_phase, on_step=on_step
        )
        if http
        else None
    )
    rates = None
    if decisions:
        on_phase("Redis decisions per second: client loop, pipelined client, redis-benchmark")
        rates = measure_decisions(redis_url, seconds=decision_seconds)
    return RateLimitBenchReport(http=overhead, decisions=rates)
