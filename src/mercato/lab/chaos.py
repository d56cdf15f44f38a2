"""The checkout chaos run: real processes, injected faults, a worker killed at random; then proof.

Hypothesis (guide §1, §2, §21, §36, "Resilient Payment Workflow"): with the PSP failing 30 % of
calls, hanging 10 % and losing 5 % of its answers, the carrier failing 10 %, and the saga worker
SIGKILLed and restarted at random, every checkout still ends in exactly one terminal state within a
bound, no payment is captured twice, every capture ships, every cancelled order is paid back and
unshipped, stock is conserved per SKU, and every saga event reaches the stream exactly once.

The run (`run_chaos`):

1. prepares a database — a SQLite file in a temp dir, or a fresh PostgreSQL database it creates and
   drops — migrates it and seeds a small catalog with known stock and N customer accounts (through
   the identity service, so they log in over HTTP like anyone else);
2. starts, each as its own process on a free 127.0.0.1 port: `mercato provider psp` and
   `mercato provider carrier` (fault flags, their own SQLite databases), `mercato api --workers 1`
   (only starts sagas) and `mercato worker` (saga runner, outbox relay, jobs);
3. drives K checkouts over HTTP with bounded concurrency — log in, empty the cart, put lines,
   `POST /v1/checkout` with an Idempotency-Key, retried with the same key on transport errors, 5xx
   and 409-in-flight (and re-sent once in a while after a 202, as a client that lost the answer
   would) — while a killer SIGKILLs the worker at random moments and restarts it;
4. waits, bounded, until every saga is terminal and the outbox is drained; stops the shop;
5. collects the evidence from every side and checks the invariants (`chaos_invariants`).

This module prepares the shop and runs the steps; the configuration and report are in `chaos_model`,
the processes and the killer in `chaos_processes`, the customers in `chaos_driver`, settling and the
evidence in `chaos_evidence`, the invariants in `chaos_invariants` and the command in `chaos_cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.config import (
    AuthSettings,
    CheckoutSettings,
    DatabaseSettings,
    Environment,
    Settings,
    ShopSettings,
)
from mercato.demo.seed import demo_products
from mercato.kit.ports import free_port
from mercato.kit.storage.migrations import upgrade
from mercato.lab.chaos_driver import Driver
from mercato.lab.chaos_evidence import collect_evidence, count_outcomes, settle
from mercato.lab.chaos_invariants import (
    check_all,
)
from mercato.lab.chaos_model import CUSTOMER_PASSWORD, SHOP_SECRET, ChaosConfig, ChaosReport, Log
from mercato.lab.chaos_processes import ShopProcess, killer, wait_http
from mercato.providers.config import ProviderSettings
from mercato.shop.identity.contracts import Role

__all__ = ["ChaosConfig", "ChaosReport", "run_chaos"]


@contextlib.asynccontextmanager
async def _database(config: ChaosConfig, workdir: Path) -> AsyncIterator[str]:
    """A fresh shop database URL; a PostgreSQL one is created here and dropped afterwards."""
    url = config.database_url
    if url is not None and url.startswith("sqlite"):
        yield url
        return
    if url is None and config.backend == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / 'shop.db'}"
        return
    admin = (url or config.pg_admin_dsn).replace("postgresql+asyncpg://", "postgresql://")
    name = f"{config.database_prefix}_{uuid.uuid4().hex[:12]}"
    shop_url = _on_database(admin, name)
    # A multi-host URL (`?host=a&host=b...&target_session_attrs=read-write`, `mercato cluster`):
    # asyncpg takes the comma form, the shop's SQLAlchemy URL keeps the query form.
    admin = _asyncpg_dsn(admin)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield shop_url
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def _on_database(url: str, name: str) -> str:
    """`url` (a PostgreSQL server URL, multi-host allowed) pointed at database `name`, for asyncpg
    under SQLAlchemy."""
    return (
        make_url(url)
        .set(drivername="postgresql+asyncpg", database=name)
        .render_as_string(hide_password=False)
    )


def _asyncpg_dsn(url: str) -> str:
    """A libpq-style DSN asyncpg reads: several `host=` query parameters become the comma host list
    (asyncpg keeps only the last `host=`)."""
    parsed = make_url(url)
    hosts = parsed.query.get("host")
    if not isinstance(hosts, tuple):
        return url.replace("postgresql+asyncpg://", "postgresql://")
    query = {k: v for k, v in parsed.query.items() if k != "host"}
    user = parsed.username or "postgres"
    params = "&".join(f"{k}={v}" for k, v in query.items() if isinstance(v, str))
    return f"postgresql://{user}@{','.join(hosts)}/{parsed.database or 'postgres'}" + (
        f"?{params}" if params else ""
    )


def _shop_env(
    config: ChaosConfig, url: str, workdir: Path, psp_port: int, carrier_port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(
        {
            "MERCATO_ENV": "test",
            "MERCATO_DATA_DIR": str(workdir),
            "MERCATO_DATABASE_URL": url,
            "MERCATO_DATABASE_POOL_SIZE": "10",
            "MERCATO_DATABASE_MAX_OVERFLOW": "10",
            "MERCATO_AUTH_SECRET": SHOP_SECRET,
            "MERCATO_AUTH_ARGON2_TIME_COST": "1",
            "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
            "MERCATO_PROVIDERS_PSP_PORT": str(psp_port),
            "MERCATO_PROVIDERS_CARRIER_PORT": str(carrier_port),
            # No mail provider in this lab: the notifier must not reach another run's on the default port.
            "MERCATO_PROVIDERS_MAIL_SMTP_PORT": str(free_port()),
            "MERCATO_CHECKOUT_PROVIDER_TIMEOUT_S": str(config.provider_timeout_s),
            "MERCATO_CHECKOUT_PROVIDER_ATTEMPTS": str(config.provider_attempts),
            "MERCATO_CHECKOUT_SAGA_DEADLINE_S": str(config.saga_deadline_s),
            "MERCATO_CHECKOUT_SAGA_LEASE_S": str(config.saga_lease_s),
            "MERCATO_TELEMETRY_LOG_LEVEL": "warning",
        }
    )
    return env


def _settings(config: ChaosConfig, url: str, psp_port: int, carrier_port: int) -> Settings:
    """The harness's own view of the shop (seeding, settling, evidence), like the processes'."""
    return Settings(
        env=Environment.TEST,
        database=DatabaseSettings(url=url, pool_size=5, max_overflow=5),
        auth=AuthSettings(secret=SHOP_SECRET, argon2_time_cost=1, argon2_memory_kib=8192),  # type: ignore[arg-type]
        providers=ProviderSettings(psp_port=psp_port, carrier_port=carrier_port),
        checkout=CheckoutSettings(
            provider_timeout_s=config.provider_timeout_s,
            provider_attempts=config.provider_attempts,
            saga_deadline_s=config.saga_deadline_s,
            saga_lease_s=config.saga_lease_s,
        ),
        shop=ShopSettings(),
    )


async def _seed(container: Container, config: ChaosConfig) -> tuple[dict[str, int], list[str]]:
    products = await container.catalog.create_many(demo_products(config.skus, random.Random(config.seed)))
    initial = {p.sku: config.stock_per_sku for p in products}
    await container.inventory.set_available_many(sorted(initial.items()))
    emails = [f"chaos-{n:04d}@example.com" for n in range(config.concurrency)]
    for email in emails:
        await container.identity.create_user(email, CUSTOMER_PASSWORD, role=Role.CUSTOMER)
    return initial, emails


async def run_chaos(
    config: ChaosConfig, *, log: Log | None = None, on_checkout: Callable[[], None] | None = None
) -> ChaosReport:
    """Run the whole experiment (see the module docstring) and return its verdicts and counts.

    Without `config.workdir` it works in a temp dir, removed after a sound run and kept (its
    path in `report.workdir`, with every process's log) after one that broke an invariant."""
    workdir = Path(tempfile.mkdtemp(prefix="mercato-chaos-")) if config.workdir is None else config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    report = await _run(config, workdir, log or (lambda _message: None), on_checkout)
    if config.workdir is None and report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
        report.workdir = ""
    return report


async def _run(
    config: ChaosConfig, workdir: Path, say: Log, on_checkout: Callable[[], None] | None
) -> ChaosReport:
    rng = random.Random(config.seed)
    started = time.monotonic()
    backend = "sqlite" if (config.database_url or config.backend).startswith("sqlite") else "postgresql"
    async with _database(config, workdir) as url:
        await asyncio.to_thread(upgrade, SCRIPT_LOCATION, url)
        psp_port, carrier_port, api_port = free_port(), free_port(), free_port()
        container = build_container(_settings(config, url, psp_port, carrier_port))
        processes: list[ShopProcess] = []
        try:
            initial, emails = await _seed(container, config)
            say(f"seeded {len(initial)} SKUs × {config.stock_per_sku} units, {len(emails)} customers")
            bare_env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
            psp = ShopProcess(
                "psp",
                [
                    "provider", "psp", "--port", str(psp_port),
                    "--database-url", f"sqlite+aiosqlite:///{workdir / 'psp.db'}",
                    "--error-rate", str(config.psp_error_rate),
                    "--hang-rate", str(config.psp_hang_rate),
                    "--lost-response-rate", str(config.psp_lost_response_rate),
                    "--seed", str(config.seed),
                ],
                bare_env,
                workdir,
            )  # fmt: skip
            carrier = ShopProcess(
                "carrier",
                [
                    "provider", "carrier", "--port", str(carrier_port),
                    "--database-url", f"sqlite+aiosqlite:///{workdir / 'carrier.db'}",
                    "--error-rate", str(config.carrier_error_rate),
                    "--seed", str(config.seed + 1),
                ],
                bare_env,
                workdir,
            )  # fmt: skip
            env = _shop_env(config, url, workdir, psp_port, carrier_port)
            api = ShopProcess(
                "api", ["api", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"], env, workdir
            )
            # No probe port: several labs (and other users of 8081) may share the machine.
            worker = ShopProcess("worker", ["worker", "--http-port", "0"], env, workdir)
            processes.extend([psp, carrier, api, worker])
            for process in (psp, carrier, api):
                process.start()
            await wait_http(psp, f"http://127.0.0.1:{psp_port}/healthz")
            await wait_http(carrier, f"http://127.0.0.1:{carrier_port}/healthz")
            await wait_http(api, f"http://127.0.0.1:{api_port}/startupz")
            worker.start()
            say(f"processes up in {workdir}: psp :{psp_port}, carrier :{carrier_port}, api :{api_port}")

            driver = Driver(
                f"http://127.0.0.1:{api_port}", config, sorted(initial), random.Random(rng.random())
            )
            kill_times: list[float] = []
            await asyncio.gather(
                driver.run(emails, on_checkout or (lambda: None)),
                killer(worker, config, random.Random(rng.random()), say, kill_times),
            )
            say(f"{len(driver.attempts)} checkouts driven, {len(kill_times)} kills; settling")
            settled = await settle(container, config.settle_timeout_s, say)
            worker.stop()
            api.stop()
            evidence, deliveries = await collect_evidence(container, initial, driver.attempts, config.bound_s)
            verdicts = check_all(evidence)
            logs = {p.name: p.tail() for p in processes}
            return ChaosReport(
                backend=backend,
                checkouts=config.checkouts,
                kills=len(kill_times),
                duration_s=time.monotonic() - started,
                settled=settled,
                verdicts=verdicts,
                counts=count_outcomes(evidence, driver, len(kill_times), deliveries),
                workdir=str(workdir),
                logs=logs,
            )
        finally:
            for process in reversed(processes):
                process.stop()
            await container.close()
