"""`mercato lab breaker`: a PSP outage under steady checkout load, with and without the breaker.

Hypothesis (guide §1): with a circuit breaker and a retry budget in front of the payment provider, an
outage costs each checkout about the fail-fast time, and the provider stops receiving the retry storm
(it sees one half-open probe per open wait instead of `rate x attempts`).

Method: the shop's container in this process (saga runner, both simulated providers on local ports,
SQLite or PostgreSQL), an open-loop load of checkouts at `rate` per second for `duration_s` (request i
is due at `t0 + i / rate` whatever happened to earlier ones, as in the bench's timetable), and an
outage of the PSP for `outage_s` in the middle (`PUT /admin/faults` with an outage window). The
outage is made of hangs by default (`outage_mode="hang"`: no business request is ever answered, so a
caller without a breaker waits out its whole per-attempt timeout, then retries), or of immediate 503s
(`"error"`). The same load runs once per variant:

- `on`: resilience policy (bulkhead, breaker, per-attempt timeout, budgeted retries), and the PSP's
  record lookups (the compensations' "what did I do?") behind a breaker of their own;
- `shared`: the same policy, with the lookups behind the writes' breaker (the wiring before the
  lookups had their own), so an open circuit refuses compensations too;
- `off`: `CheckoutSettings.resilience` off: the saga's own step retries only.

The simulated PSP never faults its reads (they are the tests' oracle), so `on` shows what separate
lookups buy when the provider's write path alone is down.

`POST /v1/checkout` only starts the saga (one database transaction, then 202) and never waits for a
provider, so the load calls `CheckoutService.start`, the use case behind that route, directly: the
architecture's layers keep `lab` from importing the gateway, the workers or the bench, and the HTTP
edge is not what an outage changes. What the claim is about is measured behind it:

- payment-call latency: every attempt of the saga's `authorize_payment` step (its duration as the
  saga recorded it; with the policy on, its inner retries are inside one attempt), placed on the
  timeline where it started;
- the same per phase of the outage, cut at the PSP breaker's own transitions (recorded by a hook):
  `before` the outage, `detection` (outage start until the breaker first opens: these attempts hang
  until their timeout, whatever the breaker), `open` (first trip until the outage ends: the fail-fast
  time plus the half-open probes) and `recovery` (after the outage; the breaker may still be open
  until its next probe). Without a breaker the whole outage is `detection`;
- the checkout call itself (`CheckoutService.start`, what `POST /v1/checkout` waits for), per phase;
- time-to-terminal: from the checkout until the saga completed or compensated;
- PSP received requests per second: the PSP's own `mercato_provider_requests_received_total`
  (`POST /v1/...`: the operations an outage faults and a retry storm repeats), sampled every second;
  its reads (`GET /v1/...`, the compensations' lookups) are counted apart;
- compensation attempts refused by an open circuit (`CircuitOpen` in the saga's step history).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.config import AuthSettings, CheckoutSettings, DatabaseSettings, Environment, Settings
from mercato.demo.seed import demo_products
from mercato.kit.ports import free_port
from mercato.kit.resilience import BreakerState, Outcome
from mercato.kit.sagas import SagaRunner
from mercato.kit.storage.migrations import upgrade
from mercato.lab.breaker_model import (
    PAYMENT_STEP,
    BreakerOptions,
    ExperimentReport,
    RunResult,
    Variant,
    per_second,
    percentile_ms,
    phase_bounds,
    summarize,
)
from mercato.lab.breaker_report import plot_report, report_table
from mercato.providers.config import ProviderSettings
from mercato.providers.server import serve_providers
from mercato.shop.checkout.resilient import PSP, PSP_READS

__all__ = [
    "BreakerOptions",
    "ExperimentReport",
    "RunResult",
    "per_second",
    "percentile_ms",
    "phase_bounds",
    "plot_report",
    "report_table",
    "run_experiment",
    "run_mode",
    "summarize",
]


class _TransitionLog:
    """`BreakerHooks` that note the PSP writes' breaker transitions on the load's timeline."""

    def __init__(self, log: list[tuple[float, str, str]]) -> None:
        self._log = log
        self.t0 = time.monotonic()

    def on_state_change(self, name: str, old: BreakerState | None, new: BreakerState) -> None:
        if name == PSP and old is not None:
            self._log.append((time.monotonic() - self.t0, old.value, new.value))

    def on_call(self, name: str, outcome: Outcome, duration_s: float) -> None:
        return None

    def on_rejected(self, name: str) -> None:
        return None


def _psp_received(metrics_text: str, method: str = "POST") -> int:
    """Requests the PSP received on its `/v1/...` routes with this method, from its `/metrics`."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if (
                sample.name == "mercato_provider_requests_received_total"
                and sample.labels.get("method") == method
                and sample.labels.get("route", "").startswith("/v1/")
            ):
                total += sample.value
    return int(total)


def _breaker_counts(container: Container) -> tuple[int, int, int]:
    """(times opened, transitions) of the PSP's breaker and the rejections of its lookups' breaker."""
    opened = transitions = read_rejections = 0.0
    for family in container.metrics_registry.collect():
        for sample in family.samples:
            dependency = sample.labels.get("dependency")
            if sample.name == "mercato_breaker_rejections_total" and dependency == PSP_READS:
                read_rejections += sample.value
            if sample.name != "mercato_breaker_transitions_total" or dependency != PSP:
                continue
            transitions += sample.value
            if sample.labels["to_state"] == "open":
                opened += sample.value
    return int(opened), int(transitions), int(read_rejections)


@contextlib.asynccontextmanager
async def _database(options: BreakerOptions, workdir: Path) -> AsyncIterator[str]:
    """The shop's database for one run: a SQLite file, or a fresh PostgreSQL database dropped after."""
    if options.database_url is None or not options.database_url.startswith("postgresql"):
        yield options.database_url or f"sqlite+aiosqlite:///{workdir / 'shop.db'}"
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(options.database_url)
    admin_dsn = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    name = f"{options.database_prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def _settings(workdir: Path, database_url: str, options: BreakerOptions, *, resilience: bool) -> Settings:
    return Settings(
        env=Environment.DEV,
        data_dir=workdir,
        database=DatabaseSettings(url=database_url, pool_size=20, max_overflow=20),
        auth=AuthSettings(argon2_time_cost=1, argon2_memory_kib=8192),
        providers=ProviderSettings(
            psp_port=free_port(), carrier_port=free_port(), data_dir=workdir, graceful_shutdown_s=1
        ),
        checkout=CheckoutSettings(
            resilience=resilience,
            breaker_minimum_calls=options.breaker_minimum_calls,
            breaker_consecutive_failures=options.breaker_consecutive_failures,
            breaker_open_s=options.breaker_open_s,
            breaker_max_open_s=options.breaker_max_open_s,
            breaker_half_open_probes=options.breaker_half_open_probes,
        ),
    )


async def run_mode(
    options: BreakerOptions,
    *,
    variant: Variant,
    workdir: Path,
    on_progress: Callable[[str], None] | None = None,
) -> RunResult:
    """One run of the load and the outage, on a fresh shop database and fresh providers."""
    say = on_progress or (lambda _message: None)
    async with _database(options, workdir) as database_url:
        settings = _settings(workdir, database_url, options, resilience=variant != "off")
        return await _run_mode(options, settings, variant, say)


async def _run_mode(
    options: BreakerOptions, settings: Settings, mode: Variant, say: Callable[[str], None]
) -> RunResult:
    # Migrations run in a thread: Alembic drives its own event loop for the async engine.
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, settings.database.url)
    providers = await serve_providers(settings.providers)
    container = build_container(settings, separate_read_breakers=mode != "shared")
    result = RunResult(mode=mode)
    transitions = _TransitionLog(result.breaker_log)
    container.breakers.add_hooks(transitions)
    stop = asyncio.Event()
    checkout_settings = settings.checkout
    # Built as `mercato worker` builds it (workers.sagas), which the layers keep out of reach.
    runner = SagaRunner(
        container.db,
        container.sagas,
        container.saga_definitions,
        container.clock,
        owner=f"lab-{mode}",
        events=container.saga_events,
        lease_s=checkout_settings.saga_lease_s,
        concurrency=checkout_settings.saga_concurrency,
    )
    container.checkout.on_saga_started(runner.wake)
    runner_task = asyncio.create_task(runner.run(stop))
    started: list[tuple[uuid.UUID, float]] = []
    try:
        [product] = await container.catalog.create_many(demo_products(1, random.Random(options.seed)))
        await container.inventory.set_available(product.sku, 1_000_000)
        psp_url = settings.providers.psp_base_url
        async with httpx.AsyncClient(base_url=psp_url, timeout=5.0) as psp:
            outage = {
                "start_s": options.outage_start_s,
                "end_s": options.outage_end_s,
                "mode": options.outage_mode,
            }
            (await psp.put("/admin/faults", json={"outages": [outage]})).raise_for_status()
            t0 = time.monotonic()
            transitions.t0 = t0
            wall0 = container.clock.now()
            say(f"[{mode}] load {options.rate:g}/s for {options.duration_s:g}s, PSP outage {outage}")

            async def checkout(index: int) -> None:
                customer = uuid.uuid4()
                sent = time.monotonic()
                try:
                    await container.cart.set_item(customer, product.sku, 1)
                    sent = time.monotonic()
                    order = await container.checkout.start(customer, correlation_id=f"lab-{mode}-{index}")
                except Exception:  # noqa: BLE001 - counted: the experiment reports failed starts
                    result.start_errors += 1
                    return
                finally:
                    result.starts.append((sent - t0, time.monotonic() - sent))
                started.append((order.id, sent - t0))

            async def sample_psp() -> None:
                text = (await psp.get("/metrics")).text
                previous = _psp_received(text)
                first, first_reads = previous, _psp_received(text, "GET")
                tick = 1
                while True:
                    await asyncio.sleep(max(0.0, t0 + tick - time.monotonic()))
                    text = (await psp.get("/metrics")).text
                    current = _psp_received(text)
                    result.psp_rate.append((float(tick), float(current - previous)))
                    result.psp_total = current - first
                    result.psp_reads_total = _psp_received(text, "GET") - first_reads
                    previous, tick = current, tick + 1

            sampler = asyncio.create_task(sample_psp())
            try:
                pending = await _load_and_drain(options, checkout, started, container)
                # One more second of samples so the tail of the run is in the series.
                await asyncio.sleep(max(0.0, t0 + math.ceil(time.monotonic() - t0) + 0.05 - time.monotonic()))
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        result.unfinished = len(pending)
        await _collect(container, started, wall0, result)
        result.breaker_opened, result.breaker_transitions, result.read_breaker_rejections = _breaker_counts(
            container
        )
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await runner_task
        await container.close()
        await providers.stop()
    return result


async def _load_and_drain(
    options: BreakerOptions,
    checkout: Callable[[int], Coroutine[Any, Any, None]],
    started: list[tuple[uuid.UUID, float]],
    container: Container,
) -> set[uuid.UUID]:
    """Send the open-loop load, then wait (up to `drain_s`) for its sagas; returns those unfinished."""
    t0 = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    # Open loop: checkout j is due at t0 + j / rate, whether or not earlier ones are done.
    for j in range(int(options.rate * options.duration_s)):
        await asyncio.sleep(max(0.0, t0 + j / options.rate - time.monotonic()))
        tasks.append(asyncio.create_task(checkout(j)))
    await asyncio.gather(*tasks)
    drain_until = time.monotonic() + options.drain_s
    pending = {order_id for order_id, _ in started}
    while pending and time.monotonic() < drain_until:
        await asyncio.sleep(0.5)
        for order_id in list(pending):
            saga = await container.sagas.get(order_id)
            if saga is not None and saga.status.terminal:
                pending.discard(order_id)
    return pending


async def _collect(
    container: Container, started: list[tuple[uuid.UUID, float]], wall0: datetime, result: RunResult
) -> None:
    for order_id, t_start in started:
        saga = await container.sagas.get(order_id)
        if saga is None:
            continue
        if saga.status.terminal and saga.finished_at is not None:
            done_s = (saga.finished_at - wall0).total_seconds()
            result.checkouts.append((t_start, max(0.0, done_s - t_start), saga.status.value))
        for record in await container.sagas.history(order_id):
            if record.direction == "compensate" and "CircuitOpen" in (record.error or ""):
                result.compensations_refused += 1
            if record.step == PAYMENT_STEP and record.direction == "forward":
                # Recorded when it ended: its phase is the one it started in (a hang that began
                # before the trip is a cost of detection, even if it timed out after).
                seconds = record.duration_ms / 1000.0
                t = (record.recorded_at - wall0).total_seconds() - seconds
                result.attempts.append((t, seconds, record.outcome))
    result.checkouts.sort()
    result.attempts.sort()
    result.starts.sort()


async def run_experiment(
    options: BreakerOptions, *, on_progress: Callable[[str], None] | None = None
) -> ExperimentReport:
    """Each of `options.variants` in turn, each on its own fresh databases and providers."""
    runs = []
    for variant in options.variants:
        with tempfile.TemporaryDirectory(prefix="mercato-lab-breaker-") as tmp:
            runs.append(await run_mode(options, variant=variant, workdir=Path(tmp), on_progress=on_progress))
    return ExperimentReport(options=options, runs=runs)
