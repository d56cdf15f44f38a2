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

``python -m mercato.bench.ratelimit --port N --variant bare|memory|redis [--workers W]`` serves one variant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer
import uvicorn
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercato.bench.baseline import BARE_PATH, create_starlette_app
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
from mercato.bench.search import SearchPolicy
from mercato.bench.servers import (
    ServerProcess,
    _clean_env,
    body_size,
    free_port,
    migrate_and_seed,
    product_paths,
    start_mercato,
    start_server,
)
from mercato.bench.stats import Slo, StepResult
from mercato.kit.ratelimit import Limit, PipelinedRedis, RateLimiter, RedisLimiter, build_limiter
from mercato.kit.ratelimit.redis_backend import load_script_source

__all__ = [
    "VARIANTS",
    "DecisionRates",
    "RateLimitBenchReport",
    "create_app",
    "measure_decisions",
    "ratelimit_command",
    "run_ratelimit_bench",
]

VARIANTS = ("bare", "memory", "redis")
ENDPOINTS = ("empty", "product")
# Far above any rate the machine can serve: every request is admitted, so only the decision's cost shows.
NEVER_LIMITS = Limit(rate=10_000_000, period_s=1.0, burst=10_000_000)
KEYS = 1000
_ENV_VARIANT = "MERCATO_BENCH_RL_VARIANT"
_ENV_REDIS = "MERCATO_BENCH_RL_REDIS_URL"
_ENV_PREFIX = "MERCATO_BENCH_RL_PREFIX"


class LimitedApp:
    """The endpoint behind a limiter: one `hit` per request, keyed by the query string, headers added."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, limit: Limit) -> None:
        self.app = app
        self.limiter = limiter
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = "bench:" + scope.get("query_string", b"").decode("latin-1")
        decision = await self.limiter.hit(key, self.limit)
        headers = decision.header_pairs()
        if not decision.allowed:
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app() -> ASGIApp:
    """The variant named by the environment (uvicorn workers re-import this factory)."""
    variant = os.environ.get(_ENV_VARIANT, "bare")
    bare = create_starlette_app()
    if variant == "bare":
        return bare
    limiter = build_limiter(
        "token_bucket",
        variant,
        redis_url=os.environ.get(_ENV_REDIS, "redis://127.0.0.1:6379/0"),
        key_prefix=os.environ.get(_ENV_PREFIX, "mercato:bench:rl:"),
        fail_open=False,  # a benchmark that silently stopped limiting would measure nothing
        # Capacity, not timeouts, is measured: on a loaded machine the production 100 ms socket timeout
        # opens the breaker and every refusal would count as an error. The p99 SLO still bounds latency.
        socket_timeout_s=1.0,
        timeout_s=2.0,
    )
    return LimitedApp(bare, limiter, NEVER_LIMITS)


def serve(*, port: int, workers: int, variant: str, host: str = "127.0.0.1") -> None:
    os.environ[_ENV_VARIANT] = variant
    uvicorn.run(
        "mercato.bench.ratelimit:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_config=None,
        proxy_headers=False,
    )


def start_variant(variant: str, *, workdir: Path, workers: int, redis_url: str, prefix: str) -> ServerProcess:
    port = free_port()
    args = ["-m", "mercato.bench.ratelimit", "--port", str(port), "--workers", str(workers)]
    args += ["--variant", variant]
    env = _clean_env({_ENV_REDIS: redis_url, _ENV_PREFIX: prefix})
    return start_server(variant, args, port=port, workdir=workdir, env=env, ready_path=BARE_PATH)


# --- decisions per second ------------------------------------------------------------------------------


@dataclass
class DecisionRates:
    """Token-bucket decisions per second on one Redis, by client."""

    client_loop: float  # RedisLimiter.hit on the pipelined connection from `concurrency` tasks (the gateway)
    client_loop_redis_py: float  # the same loop on a redis-py client (pool of `concurrency` connections)
    client_loop_cpu_us: float  # client CPU per decision, pipelined connection
    client_loop_redis_py_cpu_us: float  # client CPU per decision, redis-py
    client_pipelined: float  # raw EVALSHA in pipelines of `batch` (the Python client's ceiling)
    redis_benchmark: float | None  # redis-benchmark, same EVALSHA, `bench_clients` connections
    redis_benchmark_pipelined: float | None  # the same with -P `batch`
    concurrency: int
    batch: int
    bench_clients: int
    seconds: float
    script_sha: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def _client_loop(
    redis_url: str, prefix: str, *, seconds: float, concurrency: int, pipelined: bool = True
) -> tuple[float, float]:
    """Decisions/s and this process's CPU µs per decision (Redis runs in its own process)."""
    client: Redis | PipelinedRedis = (
        PipelinedRedis(redis_url, socket_timeout_s=1.0)
        if pipelined
        else Redis.from_url(redis_url, max_connections=concurrency)
    )
    limiter = RedisLimiter("token_bucket", client=client, key_prefix=prefix)
    count = 0
    try:
        await limiter.hit("warm", NEVER_LIMITS)  # loads the script once
        stop = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal count
            n = offset
            while time.perf_counter() < stop:
                await limiter.hit(f"k{n % KEYS}", NEVER_LIMITS)
                n += concurrency
                count += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        return count / elapsed, cpu / max(count, 1) * 1e6
    finally:
        await client.aclose()


def _script_args() -> list[str]:
    limit = NEVER_LIMITS
    return [str(limit.rate), repr(float(limit.period_s)), str(limit.capacity), "1", "1", "", ""]


async def _pipelined(redis_url: str, prefix: str, sha: str, *, seconds: float, batch: int) -> float:
    client = Redis.from_url(redis_url)
    args = _script_args()
    count = 0
    try:
        stop = time.perf_counter() + seconds
        started = time.perf_counter()
        n = 0
        while time.perf_counter() < stop:
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.evalsha(sha, 1, f"{prefix}token_bucket:p{n % KEYS}", *args)
                n += 1
            await pipe.execute()
            count += batch
        return count / (time.perf_counter() - started)
    finally:
        await client.aclose()


def _redis_benchmark(
    redis_url: str, prefix: str, sha: str, *, requests: int, clients: int, pipeline: int
) -> float:
    url = urlparse(redis_url)
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise FileNotFoundError("redis-benchmark is not on PATH (Debian: apt-get install redis-tools)")
    command = [binary, "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379)]
    if url.path and url.path.strip("/"):
        command += ["--dbnum", url.path.strip("/")]
    command += ["-n", str(requests), "-c", str(clients), "-P", str(pipeline), "-r", str(KEYS), "--csv"]
    command += ["EVALSHA", sha, "1", f"{prefix}token_bucket:b__rand_int__", *_script_args()]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout  # noqa: S603
    rows = list(csv.reader(io.StringIO(out)))
    return float(rows[-1][1])


async def _cleanup(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


def measure_decisions(
    redis_url: str,
    *,
    seconds: float = 5.0,
    concurrency: int = 32,
    batch: int = 16,
    bench_clients: int = 50,
    run_redis_benchmark: bool = True,
) -> DecisionRates:
    """Token-bucket decisions/s on Redis from our client and from redis-benchmark (keys cleaned up after)."""
    prefix = f"mercato:bench:rl:{uuid.uuid4().hex[:12]}:"
    source = load_script_source("token_bucket")

    async def load() -> str:
        client = Redis.from_url(redis_url)
        try:
            return str(await client.script_load(source))  # type: ignore[misc]
        finally:
            await client.aclose()

    try:
        sha = asyncio.run(load())
        loop_rate, loop_cpu = asyncio.run(
            _client_loop(redis_url, prefix, seconds=seconds, concurrency=concurrency)
        )
        loop_rate_redis_py, loop_cpu_redis_py = asyncio.run(
            _client_loop(redis_url, prefix, seconds=seconds, concurrency=concurrency, pipelined=False)
        )
        piped = asyncio.run(_pipelined(redis_url, prefix, sha, seconds=seconds, batch=batch))
        notes: list[str] = []
        plain = piped_bench = None
        if run_redis_benchmark:
            try:
                # About `seconds` worth of requests at the rate the pipelined client reached.
                n = max(20_000, int(piped * seconds))
                plain = _redis_benchmark(
                    redis_url, prefix, sha, requests=n, clients=bench_clients, pipeline=1
                )
                piped_bench = _redis_benchmark(
                    redis_url, prefix, sha, requests=n * 2, clients=bench_clients, pipeline=batch
                )
            except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
                notes.append(f"redis-benchmark not run: {exc}")
    finally:
        asyncio.run(_cleanup(redis_url, prefix))
    return DecisionRates(
        client_loop=loop_rate,
        client_loop_redis_py=loop_rate_redis_py,
        client_loop_cpu_us=loop_cpu,
        client_loop_redis_py_cpu_us=loop_cpu_redis_py,
        client_pipelined=piped,
        redis_benchmark=plain,
        redis_benchmark_pipelined=piped_bench,
        concurrency=concurrency,
        batch=batch,
        bench_clients=bench_clients,
        seconds=seconds,
        script_sha=sha,
        notes=notes,
    )


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
        asyncio.run(_cleanup(redis_url, prefix))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the bare endpoint, optionally behind a limiter.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, default="bare")
    args = parser.parse_args(argv)
    serve(port=args.port, workers=args.workers, variant=args.variant)


if __name__ == "__main__":
    main()


# --- the command -------------------------------------------------------------------------------------------


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
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    if report.http is not None:
        Console().print(_overhead_table(report.http))
        machine = report.http.machine
        console.print(
            f"load average start/end: {machine.get('loadavg_at_start')} / {machine.get('loadavg_at_end')}"
        )
    if report.decisions is not None:
        Console().print(_decisions_table(report.decisions))
        for note in report.decisions.notes:
            console.print(f"[yellow]{note}[/yellow]")
