"""``mercato bench checkout``: completed checkouts per second and their latency at fixed arrival rates.

The run starts everything it measures, on free loopback ports:

1. a database (a SQLite file in a temp dir, or the PostgreSQL database of ``--database-url``,
   created and dropped with ``--create-database``), migrated and seeded by the project's own code,
   with ``customers`` customer accounts and every SKU's stock raised so checkouts never run out;
2. the simulated PSP, carrier and mail provider (healthy: no faults, no added latency), each on its
   own SQLite file;
3. Mercato, through `mercato.bench.checkout_probe` (the real ``mercato`` command plus a statement
   counter): ``distributed`` = ``mercato api`` + ``mercato worker`` (the saga runner and periodic
   jobs) + the providers as three ``mercato provider`` processes; ``embedded`` = ``mercato up`` (API,
   providers, saga runner and jobs in one event loop);
4. the bare baseline (`mercato.bench.baseline`), for the same request pattern at the same rate.

Customers log in once, before anything is measured. Then, for each rate of the ladder: the baseline
step, the Mercato step (open loop: checkout ``i`` at ``t0 + i/rate``), a drain until every accepted
checkout's saga has finished (or ``drain_s`` passed), a wait until the servers go quiet (the side
jobs' catching up is the step's work too: its CPU and statements count), and the accounting from the
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mercato.bench.checkout_client import CheckoutLoad, CheckoutLoadResult, run_checkout_load, warm
from mercato.bench.checkout_report import (
    LOAD_GENERATOR,
    MACHINE,
    POSTGRESQL,
    BaselineStep,
    CheckoutStep,
    SagaOutcome,
    account_completions,
    delta,
    mean_by_key,
    rate_ladder,
)
from mercato.bench.client import ALLOWED_HOST
from mercato.bench.runner import machine_facts
from mercato.bench.servers import (
    ServerProcess,
    _clean_env,
    bench_settings,
    command_cpu_s,
    database,
    free_port,
    machine_busy_s,
    process_tree_cpu_s,
    settle,
    start_baseline,
    start_server,
)
from mercato.bench.stats import Counts, LatencyHistogram
from mercato.bench.timetable import total_requests
from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.config import SeedSettings
from mercato.demo.seed import demo_accounts, demo_products, seed_demo
from mercato.kit.sagas.store import ACTIVE, saga_instances, saga_steps
from mercato.kit.storage.migrations import upgrade
from mercato.shop.identity.contracts import Role

MODES = ("distributed", "embedded")
PLENTY = 10_000_000  # units per SKU: no checkout of the run can run out


@dataclass(frozen=True)
class CheckoutBenchOptions:
    rates: tuple[float, ...] = rate_ladder()
    duration_s: float = 5.0
    warmup_s: float = 2.0
    drain_s: float = 30.0
    mode: str = "distributed"
    database_url: str | None = None
    create_database: bool = False
    customers: int = 400
    products: int = 400
    timeout_s: float = 5.0
    max_connections: int = 256
    stop_when_saturated: bool = True
    profile_dir: Path | None = None  # py-spy the Mercato and provider processes during the last step
    # MERCATO_* settings for the Mercato processes, on top of the bench's own (NAME, VALUE) pairs.
    settings: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode is one of {MODES}")
        if self.products < self.customers:
            raise ValueError("need at least one product per customer (each customer has its own SKU)")


@dataclass
class CheckoutBenchReport:
    options: CheckoutBenchOptions
    machine: dict[str, Any]
    database: str
    steps: list[CheckoutStep] = field(default_factory=list)
    verbs: dict[str, float] = field(default_factory=dict)  # phase|VERB -> per checkout, last step
    profiles: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        opts = self.options
        return {
            "machine": self.machine,
            "database": self.database,
            "settings": {
                "mode": opts.mode,
                "duration_s": opts.duration_s,
                "warmup_s": opts.warmup_s,
                "drain_s": opts.drain_s,
                "customers": opts.customers,
                "timeout_s": opts.timeout_s,
            },
            "steps": [s.to_dict() for s in self.steps],
            "statement_verbs_per_checkout_last_step": {k: round(v, 2) for k, v in sorted(self.verbs.items())},
            "profiles": self.profiles,
        }


Phase = Callable[[str], None]
StepHook = Callable[[CheckoutStep], None]


@dataclass
class _Probe:
    server: ServerProcess
    counter_port: int

    def counts(self) -> dict[str, dict[str, float]]:
        response = httpx.get(f"http://{ALLOWED_HOST}:{self.counter_port}/", timeout=5.0)
        response.raise_for_status()
        data: dict[str, dict[str, float]] = response.json()
        return data


async def prepare_database(url: str, workdir: Path, *, products: int, customers: int) -> list[str]:
    """Migrate, seed (products, customers) and make stock plentiful; the SKUs, in seed order."""
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, url)
    settings = bench_settings(url, workdir, products=products)
    settings.seed.customers = customers
    container = build_container(settings)
    try:
        await seed_demo(container)
        skus = [d.sku for d in demo_products(products, random.Random(settings.seed.random_seed))]
        await container.inventory.set_available_many([(sku, PLENTY) for sku in skus])
    finally:
        await container.close()
    return skus


async def login_customers(base_url: str, *, products: int, customers: int) -> list[str]:
    """Access tokens for the seeded customers (before measuring; the seed's passwords are reproducible)."""
    seed = SeedSettings(products=products, customers=customers)
    accounts = [(email, pw) for role, email, pw in demo_accounts(seed) if role is Role.CUSTOMER]
    gate = asyncio.Semaphore(8)

    async def one(client: httpx.AsyncClient, email: str, password: str) -> str:
        async with gate:
            response = await client.post("/v1/auth/login", json={"email": email, "password": password})
            response.raise_for_status()
            return str(response.json()["access_token"])

    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        return list(await asyncio.gather(*(one(client, e, p) for e, p in accounts)))


def _mercato_env(
    url: str, workdir: Path, ports: dict[str, int], settings: tuple[tuple[str, str], ...] = ()
) -> dict[str, str]:
    return _clean_env(
        {
            "MERCATO_DATABASE_URL": url,
            "MERCATO_DATA_DIR": str(workdir),
            "MERCATO_PROVIDERS_PSP_PORT": str(ports["psp"]),
            "MERCATO_PROVIDERS_CARRIER_PORT": str(ports["carrier"]),
            # Free ports, so two runs never meet.
            "MERCATO_PROVIDERS_MAIL_PORT": str(ports["mail"]),
            "MERCATO_PROVIDERS_MAIL_SMTP_PORT": str(ports["mail_smtp"]),
            # Logins happen before measuring; cheap hashes keep them (and their re-hash check) quick.
            "MERCATO_AUTH_ARGON2_TIME_COST": "1",
            "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
            # Every simulated customer comes from 127.0.0.1: the edge limiter would measure itself
            # (and refuse the logins), not checkout capacity.
            "MERCATO_RATELIMIT_ENABLED": "false",
            **dict(settings),
        }
    )


def _probe(name: str, command: list[str], *, port: int | None, workdir: Path, env: dict[str, str]) -> _Probe:
    counter = free_port()
    args = ["-m", "mercato.bench.checkout_probe", "--counter-port", str(counter), "--", *command]
    # A worker has no HTTP port of its own: it is ready when its counter answers.
    ready_port, path = (port, "/startupz") if port is not None else (counter, "/")
    server = start_server(name, args, port=ready_port, workdir=workdir, env=env, ready_path=path)
    return _Probe(server=server, counter_port=counter)


@contextlib.contextmanager
def mercato_processes(
    mode: str, url: str, workdir: Path, settings: tuple[tuple[str, str], ...] = ()
) -> Iterator[tuple[ServerProcess, list[_Probe], list[ServerProcess]]]:
    """The API server, every counted Mercato process, and the provider processes (distributed only)."""
    started: list[ServerProcess] = []
    ports = {name: free_port() for name in ("psp", "carrier", "mail", "mail_smtp")}
    env = _mercato_env(url, workdir, ports, settings)
    try:
        providers: list[ServerProcess] = []
        if mode == "distributed":
            # The mail provider too: without it every order mail fails and the notifier retries it
            # up to its attempt limit, so the bench would measure retries no deployment makes.
            for kind in ("psp", "carrier", "mail"):
                port = ports[kind]
                args = ["-m", "mercato.cli.main", "provider", kind, "--port", str(port)]
                args += ["--data-dir", str(workdir)]
                if kind == "mail":
                    args += ["--smtp-port", str(ports["mail_smtp"])]
                providers.append(
                    start_server(kind, args, port=port, workdir=workdir, env=env, ready_path="/healthz")
                )
                started.append(providers[-1])
        api_port = free_port()
        bind = ["--host", ALLOWED_HOST, "--port", str(api_port)]
        if mode == "distributed":
            api = _probe("api", ["api", *bind, "--workers", "1"], port=api_port, workdir=workdir, env=env)
            started.append(api.server)
            worker = _probe("worker", ["worker", "--http-port", "0"], port=None, workdir=workdir, env=env)
            started.append(worker.server)
            probes = [api, worker]
        else:
            api = _probe("embedded", ["up", *bind], port=api_port, workdir=workdir, env=env)
            started.append(api.server)
            probes = [api]
        yield api.server, probes, providers
    finally:
        for server in reversed(started):
            server.stop()


class CheckoutBench:
    def __init__(
        self, options: CheckoutBenchOptions, executor: ProcessPoolExecutor, engine: AsyncEngine
    ) -> None:
        self.options = options
        self.executor = executor
        self.engine = engine
        self._next_customer = 0
        self._steps_run = 0

    async def _load(self, load: CheckoutLoad) -> CheckoutLoadResult:
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(self.executor, run_checkout_load, load)
        return CheckoutLoadResult.from_dict(raw)

    def _tag(self) -> str:
        self._steps_run += 1
        return f"ck{self._steps_run}x{secrets.token_hex(3)}"

    async def sessions(self) -> int | None:
        """PostgreSQL sessions opened on the bench's database so far (`pg_stat_database.sessions`,
        PostgreSQL 14+): a pool that closes and reopens connections under load shows here."""
        if self.engine.dialect.name != "postgresql":
            return None
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            )
        return None if value is None else int(value)

    async def baseline(self, server: ServerProcess, rate: float) -> BaselineStep:
        opts = self.options
        load = CheckoutLoad(
            port=server.port,
            rate_per_s=rate,
            duration_s=opts.duration_s,
            t0_s=time.monotonic() + 0.25,
            tag=self._tag(),
            mode="bare",
            max_connections=opts.max_connections,
            timeout_s=opts.timeout_s,
        )
        result = await self._load(load)
        return BaselineStep(counts=result.counts, histogram=LatencyHistogram.merged([result.accept]))

    async def checkouts(
        self, api: ServerProcess, rate: float, duration_s: float, tokens: list[str], skus: list[str]
    ) -> tuple[str, CheckoutLoadResult]:
        opts = self.options
        tag = self._tag()
        load = CheckoutLoad(
            port=api.port,
            rate_per_s=rate,
            duration_s=duration_s,
            t0_s=time.monotonic() + 0.25,
            tag=tag,
            tokens=tuple(tokens),
            skus=tuple(skus[: len(tokens)]),
            first_customer=self._next_customer,
            max_connections=opts.max_connections,
            timeout_s=opts.timeout_s,
        )
        # The next step starts with the customers this one used longest ago.
        self._next_customer = (self._next_customer + load.timetable().count) % len(tokens)
        return tag, await self._load(load)

    async def drain(self, tag: str) -> None:
        """Wait until no saga of this step is still active (or ``drain_s`` passed)."""
        deadline = time.monotonic() + self.options.drain_s
        pattern = f"{tag}-%"
        while time.monotonic() < deadline:
            async with self.engine.connect() as conn:
                active = (
                    await conn.execute(
                        select(saga_instances.c.id)
                        .where(saga_instances.c.correlation_id.like(pattern))
                        .where(saga_instances.c.status.in_(ACTIVE))
                        .limit(1)
                    )
                ).first()
            if active is None:
                return
            await asyncio.sleep(0.2)

    async def outcomes(self, tag: str) -> tuple[list[SagaOutcome], dict[str, float], float | None]:
        """The step's sagas, the mean duration of each forward step, and the mean wait before the
        worker's first step (saga created by the POST -> authorize_payment started; the POST makes
        the reservation itself when every line is in stock, ADR 0087)."""
        pattern = f"{tag}-%"
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        saga_instances.c.correlation_id,
                        saga_instances.c.status,
                        saga_instances.c.finished_at,
                    ).where(saga_instances.c.correlation_id.like(pattern))
                )
            ).all()
            steps = (
                await conn.execute(
                    select(
                        saga_steps.c.step,
                        saga_steps.c.duration_ms,
                        saga_steps.c.recorded_at,
                        saga_instances.c.created_at,
                    )
                    .join(saga_instances, saga_instances.c.id == saga_steps.c.saga_id)
                    .where(saga_instances.c.correlation_id.like(pattern))
                    .where(saga_steps.c.direction == "forward", saga_steps.c.outcome == "succeeded")
                )
            ).all()
        outcomes = [
            SagaOutcome(
                correlation_id=r.correlation_id,
                status=r.status,
                finished_wall_s=r.finished_at.timestamp() if r.finished_at is not None else None,
            )
            for r in rows
        ]
        durations = mean_by_key([(s.step, float(s.duration_ms)) for s in steps])
        waits = [
            (s.recorded_at - s.created_at).total_seconds() * 1000 - s.duration_ms
            for s in steps
            if s.step == "authorize_payment"
        ]
        return outcomes, durations, (sum(waits) / len(waits) if waits else None)


def _cpu(servers: list[ServerProcess], generator_pid: int) -> dict[str, float]:
    """Each server's CPU seconds, PostgreSQL's, the load generator's (the bench process and its
    generator process: not the system's cost) and the whole machine's busy time; what the machine's
    figure holds beyond those is the kernel's own work (softirqs of loopback traffic) and anything
    else running."""
    figures = {s.name: s.cpu_s() or 0.0 for s in servers}
    own = resource.getrusage(resource.RUSAGE_SELF)
    figures[LOAD_GENERATOR] = own.ru_utime + own.ru_stime + (process_tree_cpu_s(generator_pid) or 0.0)
    figures[POSTGRESQL] = command_cpu_s("postgres")
    figures[MACHINE] = machine_busy_s()
    return figures


def _py_spy() -> str:
    """py-spy next to this interpreter (a virtualenv's bin/ is often not on PATH), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def _start_profiles(
    servers: list[ServerProcess], directory: Path, seconds: float
) -> list[subprocess.Popen[bytes]]:
    directory.mkdir(parents=True, exist_ok=True)
    procs = []
    for server in servers:
        out = directory / f"{server.name}.txt"
        args = [_py_spy(), "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds))]
        args += ["--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"]
        procs.append(
            subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        )
    return procs


async def _run(
    options: CheckoutBenchOptions, url: str, workdir: Path, on_phase: Phase, on_step: StepHook
) -> CheckoutBenchReport:
    opts = options
    machine = machine_facts()
    on_phase("migrating and seeding")
    skus = await prepare_database(url, workdir, products=opts.products, customers=opts.customers)
    report = CheckoutBenchReport(
        options=opts, machine=machine, database="postgresql" if "postgresql" in url else "sqlite"
    )
    on_phase(f"starting Mercato ({opts.mode}) and the baseline")
    baseline_server = start_baseline(workdir=workdir, workers=1, kind="starlette")
    engine = create_async_engine(url)
    context = multiprocessing.get_context("spawn")
    try:
        with (
            mercato_processes(opts.mode, url, workdir, opts.settings) as (api, probes, providers),
            ProcessPoolExecutor(max_workers=1, mp_context=context) as executor,
        ):
            # The spawned generator process imports for ~1 s: not inside the first step's slots.
            await asyncio.get_running_loop().run_in_executor(executor, warm)
            generator_pid = await asyncio.get_running_loop().run_in_executor(executor, os.getpid)
            on_phase("logging customers in")
            tokens = await login_customers(api.base_url, products=opts.products, customers=opts.customers)
            bench = CheckoutBench(opts, executor, engine)
            if opts.warmup_s > 0:
                on_phase("warm-up")
                tag, _ = await bench.checkouts(api, opts.rates[0], opts.warmup_s, tokens, skus)
                await bench.drain(tag)
            servers = [p.server for p in probes] + providers
            if opts.warmup_s > 0:
                # The warm-up's side jobs catch up before the first step: not in its figures.
                await settle(servers, limit_s=opts.drain_s)
            for number, rate in enumerate(opts.rates, start=1):
                on_phase(f"step {number}/{len(opts.rates)}: bare baseline at {rate:g}/s")
                base = await bench.baseline(baseline_server, rate)
                on_phase(f"step {number}/{len(opts.rates)}: checkouts at {rate:g}/s")
                before = [p.counts() for p in probes]
                sessions0 = await bench.sessions()
                cpu0, wall0 = _cpu(servers, generator_pid), time.monotonic()
                last = number == len(opts.rates)
                spies = (
                    _start_profiles(servers, opts.profile_dir, opts.duration_s)
                    if opts.profile_dir is not None and last
                    else []
                )
                tag, result = await bench.checkouts(api, rate, opts.duration_s, tokens, skus)
                on_phase(f"step {number}/{len(opts.rates)}: draining sagas")
                await bench.drain(tag)
                # The side jobs (ledger, notifications, projections) may still be behind: their
                # catching up is this step's work too, in its CPU and statements.
                on_phase(f"step {number}/{len(opts.rates)}: waiting for the servers to go quiet")
                await settle(servers, limit_s=opts.drain_s)
                cpu1, wall = _cpu(servers, generator_pid), time.monotonic() - wall0
                sessions1 = await bench.sessions()
                after = [p.counts() for p in probes]
                for spy in spies:
                    spy.wait(timeout=opts.duration_s + 30)
                outcomes, durations, wait_ms = await bench.outcomes(tag)
                step = _step(rate, opts.duration_s, result, outcomes, tag, base)
                step.step_ms, step.wait_to_first_step_ms = durations, wait_ms
                if sessions0 is not None and sessions1 is not None:
                    step.new_sessions_per_s = max(0, sessions1 - sessions0) / wall
                step.server_cpu_s = {k: cpu1[k] - cpu0[k] for k in cpu1}
                step.server_cpu = {k: v / wall for k, v in step.server_cpu_s.items()}
                statements: dict[str, float] = {}
                transactions: dict[str, float] = {}
                verbs: dict[str, float] = {}
                for b, a in zip(before, after, strict=True):
                    statements.update(delta(a["statements"], b["statements"]))
                    transactions.update(delta(a["transactions"], b["transactions"]))
                    verbs.update(delta(a["verbs"], b["verbs"]))
                step.statements, step.transactions = statements, transactions
                if step.completion.completed:
                    report.verbs = {k: v / step.completion.completed for k, v in verbs.items()}
                report.steps.append(step)
                on_step(step)
                if opts.stop_when_saturated and step.saturated:
                    break
            if opts.profile_dir is not None:
                report.profiles = sorted(str(p) for p in opts.profile_dir.glob("*.txt"))
    finally:
        await engine.dispose()
        baseline_server.stop()
    report.machine["loadavg_at_end"] = os.getloadavg()
    return report


def _step(
    rate: float,
    duration_s: float,
    result: CheckoutLoadResult,
    outcomes: list[SagaOutcome],
    tag: str,
    base: BaselineStep,
) -> CheckoutStep:
    counts: Counts = result.counts
    wall_offset = time.time() - time.monotonic()
    return CheckoutStep(
        offered_rate=rate,
        span_s=total_requests(rate_per_s=rate, duration_s=duration_s) / rate,
        counts=counts,
        accept=LatencyHistogram.merged([result.accept]),
        post=LatencyHistogram.merged([result.second]),
        completion=account_completions(tag=tag, accepted=result.accepted, outcomes=outcomes),
        first_due_wall_s=counts.first_due_s + wall_offset,
        baseline=base,
    )


def run_checkout_bench(
    options: CheckoutBenchOptions,
    *,
    on_phase: Phase | None = None,
    on_step: StepHook | None = None,
) -> CheckoutBenchReport:
    phase = on_phase or (lambda _m: None)
    # `database` creates/drops a PostgreSQL database with its own event loop: outside ours.
    with tempfile.TemporaryDirectory(prefix="mercato-bench-checkout-") as tmp:
        workdir = Path(tmp)
        with database(options.database_url, workdir, create=options.create_database) as url:
            return asyncio.run(_run(options, url, workdir, phase, on_step or (lambda _s: None)))
