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
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families

from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.config import AuthSettings, CheckoutSettings, DatabaseSettings, Environment, Settings
from mercato.demo.seed import demo_products
from mercato.kit.resilience import BreakerState, Outcome
from mercato.kit.sagas import SagaRunner
from mercato.kit.storage.migrations import upgrade
from mercato.providers.config import ProviderSettings
from mercato.providers.server import serve_providers
from mercato.shop.checkout.resilient import PSP, PSP_READS

__all__ = [
    "BreakerOptions",
    "ExperimentReport",
    "RunResult",
    "breaker_command",
    "phase_bounds",
    "plot_report",
    "report_table",
    "run_experiment",
    "run_mode",
]

PAYMENT_STEP = "authorize_payment"
# An attempt this long waited on the PSP: fail-fast refusals and healthy calls take milliseconds, a
# hung attempt the per-attempt timeout (1 s) or more.
SLOW_ATTEMPT_S = 0.5
PHASES = ("before", "detection", "open", "recovery")
_CHECKOUT_DEFAULTS = CheckoutSettings()

OutageMode = Literal["hang", "error"]
Variant = Literal["on", "shared", "off"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)


@dataclass(frozen=True, kw_only=True)
class BreakerOptions:
    outage_s: float = 30.0
    rate: float = 10.0
    duration_s: float = 60.0
    # After the load stops, wait this long at most for every saga to reach a terminal state.
    drain_s: float = 60.0
    # The PSP breaker's knobs; the defaults are the shop's (`CheckoutSettings`).
    breaker_minimum_calls: int = _CHECKOUT_DEFAULTS.breaker_minimum_calls
    breaker_consecutive_failures: int = _CHECKOUT_DEFAULTS.breaker_consecutive_failures
    breaker_open_s: float = _CHECKOUT_DEFAULTS.breaker_open_s
    breaker_max_open_s: float = _CHECKOUT_DEFAULTS.breaker_max_open_s
    breaker_half_open_probes: int = _CHECKOUT_DEFAULTS.breaker_half_open_probes
    outage_mode: OutageMode = "hang"
    variants: tuple[Variant, ...] = VARIANTS
    seed: int = 7
    # A PostgreSQL server URL (a throwaway database is made on it per run); None = SQLite files.
    # SQLite's single writer is what an outage's pile-up of parked sagas saturates first at ~10/s.
    database_url: str | None = None
    # The throwaway databases are named `<prefix>_<12 hex>` (sharing a server: a prefix of your own).
    database_prefix: str = "mercato_lab"

    def __post_init__(self) -> None:
        if self.outage_s <= 0 or self.rate <= 0 or self.duration_s <= self.outage_s:
            raise ValueError("need outage_s > 0, rate > 0 and duration_s > outage_s")
        if self.outage_mode not in get_args(OutageMode):
            raise ValueError(f"outage_mode must be one of {get_args(OutageMode)}")
        if not self.database_prefix.replace("_", "").isalnum():
            raise ValueError("database_prefix: letters, digits and underscores only")
        if not self.variants or any(v not in VARIANTS for v in self.variants):
            raise ValueError(f"variants must be a non-empty selection of {VARIANTS}")
        if self.breaker_half_open_probes < 1 or self.breaker_consecutive_failures < 0:
            raise ValueError("need breaker_half_open_probes >= 1 and breaker_consecutive_failures >= 0")
        if self.breaker_minimum_calls < 1 or min(self.breaker_open_s, self.breaker_max_open_s) < 0:
            raise ValueError("need breaker_minimum_calls >= 1 and open waits >= 0")

    @property
    def outage_start_s(self) -> float:
        """The outage sits in the middle of the load."""
        return (self.duration_s - self.outage_s) / 2

    @property
    def outage_end_s(self) -> float:
        return self.outage_start_s + self.outage_s


@dataclass
class RunResult:
    """One run's raw observations; times are seconds since the load started."""

    mode: str  # a Variant: "on" | "shared" | "off"
    # (t started, seconds, outcome) per authorize_payment attempt
    attempts: list[tuple[float, float, str]] = field(default_factory=list)
    # (t started, seconds to terminal, status) per checkout
    checkouts: list[tuple[float, float, str]] = field(default_factory=list)
    # (t sent, seconds) of CheckoutService.start (what POST /v1/checkout waits for), and its failures
    starts: list[tuple[float, float]] = field(default_factory=list)
    start_errors: int = 0
    # (t, from, to) per transition of the PSP writes' breaker
    breaker_log: list[tuple[float, str, str]] = field(default_factory=list)
    # (t, PSP /v1 requests received in the second ending at t)
    psp_rate: list[tuple[float, float]] = field(default_factory=list)
    psp_total: int = 0
    psp_reads_total: int = 0
    # compensation attempts the saga recorded as refused by an open circuit (nothing was sent)
    compensations_refused: int = 0
    breaker_opened: int = 0
    breaker_transitions: int = 0
    # calls refused by the open circuit of the PSP's lookups' own breaker ("psp-reads")
    read_breaker_rejections: int = 0
    unfinished: int = 0


def percentile_ms(values_s: Sequence[float], percentile: float) -> float:
    """Nearest-rank percentile (0-100) of durations in seconds, in ms; 0.0 when there are none."""
    if not values_s:
        return 0.0
    ordered = sorted(values_s)
    rank = max(1, math.ceil(percentile / 100.0 * len(ordered)))
    return round(ordered[rank - 1] * 1000.0, 1)


def phase_bounds(run: RunResult, options: BreakerOptions) -> dict[str, tuple[float, float]]:
    """`[from, to)` of each phase on the run's timeline (see the module docstring); `open` is empty
    when the breaker never opened during the outage."""
    start, end = options.outage_start_s, options.outage_end_s
    trip = next((t for t, _, new in run.breaker_log if new == "open" and start <= t < end), end)
    return {
        "before": (-math.inf, start),
        "detection": (start, trip),
        "open": (trip, end),
        "recovery": (end, math.inf),
    }


def _phase_row(run: RunResult, low: float, high: float) -> dict[str, Any]:
    attempts = [s for t, s, _ in run.attempts if low <= t < high]
    starts = [s for t, s in run.starts if low <= t < high]
    # A sample at t counts the second (t-1, t]: it belongs to the phase if most of that second does.
    rates = [r for t, r in run.psp_rate if low <= t - 0.5 < high]
    return {
        "span_s": round(high - low, 2) if math.isfinite(high - low) else None,
        "payment_attempts": len(attempts),
        "payment_slow_attempts": sum(1 for s in attempts if s >= SLOW_ATTEMPT_S),
        "payment_p50_ms": percentile_ms(attempts, 50),
        "payment_p99_ms": percentile_ms(attempts, 99),
        "checkout_start_p50_ms": percentile_ms(starts, 50),
        "checkout_start_p99_ms": percentile_ms(starts, 99),
        "psp_rps": round(sum(rates) / len(rates), 2) if rates else None,
    }


def summarize(run: RunResult, options: BreakerOptions) -> dict[str, Any]:
    """The table row of one run. "During the outage" = attempts/checkouts/samples in its window."""
    start, end = options.outage_start_s, options.outage_end_s
    all_attempts = [s for _, s, _ in run.attempts]
    outage_attempts = [s for t, s, _ in run.attempts if start <= t < end]
    outage_terminal = [s for t, s, _ in run.checkouts if start <= t < end]
    all_terminal = [s for _, s, _ in run.checkouts]
    all_starts = [s for _, s in run.starts]
    # A sample at t counts the second (t-1, t]: it belongs to the outage if that second does.
    rates = [r for t, r in run.psp_rate if start < t <= end + 1e-9]
    statuses: dict[str, int] = {}
    for _, _, status in run.checkouts:
        statuses[status] = statuses.get(status, 0) + 1
    bounds = phase_bounds(run, options)
    tripped = bounds["open"][0] < end
    reclosed = next((t for t, _, new in run.breaker_log if new == "closed" and t >= end), None)
    return {
        "mode": run.mode,
        "checkouts": len(run.checkouts),
        "statuses": statuses,
        "unfinished": run.unfinished,
        "checkout_start_p50_ms": percentile_ms(all_starts, 50),
        "checkout_start_p99_ms": percentile_ms(all_starts, 99),
        "checkout_start_errors": run.start_errors,
        "payment_attempts": len(run.attempts),
        "payment_p50_ms": percentile_ms(all_attempts, 50),
        "payment_p99_ms": percentile_ms(all_attempts, 99),
        "payment_outage_attempts": len(outage_attempts),
        "payment_outage_slow_attempts": sum(1 for s in outage_attempts if s >= SLOW_ATTEMPT_S),
        "payment_outage_p50_ms": percentile_ms(outage_attempts, 50),
        "payment_outage_p99_ms": percentile_ms(outage_attempts, 99),
        "terminal_outage_p50_ms": percentile_ms(outage_terminal, 50),
        "terminal_outage_p99_ms": percentile_ms(outage_terminal, 99),
        "terminal_p50_ms": percentile_ms(all_terminal, 50),
        "terminal_p99_ms": percentile_ms(all_terminal, 99),
        "psp_outage_rps": round(sum(rates) / len(rates), 2) if rates else 0.0,
        "psp_total_requests": run.psp_total,
        "psp_reads_total": run.psp_reads_total,
        "compensations_refused": run.compensations_refused,
        "breaker_opened": run.breaker_opened,
        "breaker_transitions": run.breaker_transitions,
        "read_breaker_rejections": run.read_breaker_rejections,
        "trip_after_s": round(bounds["open"][0] - start, 2) if tripped else None,
        # From the outage's end until the breaker closed again (its next probe succeeded).
        "reclosed_after_s": round(reclosed - end, 2) if reclosed is not None else None,
        "phases": {name: _phase_row(run, low, high) for name, (low, high) in bounds.items()},
    }


@dataclass
class ExperimentReport:
    options: BreakerOptions
    runs: list[RunResult]

    def rows(self) -> list[dict[str, Any]]:
        return [summarize(run, self.options) for run in self.runs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": asdict(self.options),
            "outage_window_s": [self.options.outage_start_s, self.options.outage_end_s],
            "runs": self.rows(),
            "series": {run.mode: per_second(run, self.options) for run in self.runs},
            # (t, from, to) of the PSP writes' breaker: where the phases were cut, and every probe.
            "breaker_transitions": {run.mode: run.breaker_log for run in self.runs},
        }


def per_second(run: RunResult, options: BreakerOptions) -> dict[str, list[float]]:
    """The plot's series: PSP req/s and the p99 of payment attempts, per whole second of the run."""
    seconds = math.ceil(options.duration_s + options.drain_s)
    buckets: dict[int, list[float]] = {}
    for t, s, _ in run.attempts:
        buckets.setdefault(int(t), []).append(s)
    last = max([int(t) for t, _ in run.psp_rate] + list(buckets) + [0])
    xs = list(range(min(seconds, last + 1)))
    p99 = [percentile_ms(buckets[x], 99) if x in buckets else float("nan") for x in xs]
    return {
        "psp_t": [t for t, _ in run.psp_rate],
        "psp_rps": [r for _, r in run.psp_rate],
        "t": [float(x) for x in xs],
        "payment_p99_ms": p99,
    }


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
            psp_port=_free_port(), carrier_port=_free_port(), data_dir=workdir, graceful_shutdown_s=1
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


def plot_report(report: ExperimentReport, path: Path) -> Path:
    """PSP received req/s (top) and per-second p99 payment-attempt latency (bottom), outage shaded."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    options = report.options
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    styles = {
        "on": ("tab:blue", "breaker + retry budget, lookups on their own breaker"),
        "shared": ("tab:green", "breaker + retry budget, lookups share it"),
        "off": ("tab:red", "no breaker (saga retries only)"),
    }
    for run in report.runs:
        series = per_second(run, options)
        color, label = styles.get(run.mode, ("tab:gray", run.mode))
        top.plot(series["psp_t"], series["psp_rps"], color=color, label=label)
        bottom.plot(series["t"], series["payment_p99_ms"], color=color, marker=".", label=label)
    for axis in (top, bottom):
        axis.axvspan(options.outage_start_s, options.outage_end_s, color="0.85", label="PSP outage")
        axis.grid(alpha=0.3)
    top.set_ylabel("PSP writes (POST) received / s")
    top.set_title(
        f"PSP outage ({options.outage_mode}s) of {options.outage_s:g} s"
        f" under {options.rate:g} checkouts/s (open loop)"
    )
    top.legend(loc="upper right")
    bottom.set_ylabel("p99 authorize_payment attempt (ms)")
    bottom.set_yscale("symlog", linthresh=10)
    bottom.set_xlabel("seconds since the load started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"


def _phase_cell(row: dict[str, Any], phase: str) -> str:
    """`n (slow) p50 / p99` of the payment attempts that started in `phase`; "-" if there were none."""
    cell = row["phases"][phase]
    if not cell["payment_attempts"]:
        return "-"
    return (
        f"{cell['payment_attempts']} ({cell['payment_slow_attempts']})"
        f" {_ms(cell['payment_p50_ms'])} / {_ms(cell['payment_p99_ms'])}"
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
    return str(value)


Render = Callable[[dict[str, Any]], str]


def _key(key: str) -> Render:
    return lambda row: _cell(row[key])


def _pair(p50: str, p99: str) -> Render:
    return lambda row: f"{_ms(row[p50])} / {_ms(row[p99])}"


def _phase(phase: str) -> Render:
    return lambda row: _phase_cell(row, phase)


def report_table(report: ExperimentReport) -> Any:
    from rich.table import Table

    options = report.options
    table = Table(
        title=f"PSP outage ({options.outage_mode}) {options.outage_s:g} s at {options.rate:g} checkouts/s"
    )
    columns: list[tuple[str, Render]] = [
        ("resilience", _key("mode")),
        ("payment p50 ms", _key("payment_outage_p50_ms")),
        ("payment p99 ms", _key("payment_outage_p99_ms")),
        ("terminal p50 ms", _key("terminal_outage_p50_ms")),
        ("terminal p99 ms", _key("terminal_outage_p99_ms")),
        ("all terminal p99 ms", _key("terminal_p99_ms")),
        ("PSP writes/s in outage", _key("psp_outage_rps")),
        ("PSP writes", _key("psp_total_requests")),
        ("PSP reads", _key("psp_reads_total")),
        ("undo refused", _key("compensations_refused")),
        ("breaker opened", _key("breaker_opened")),
        ("transitions", _key("breaker_transitions")),
        ("lookups refused", _key("read_breaker_rejections")),
        ("unfinished", _key("unfinished")),
        ("tripped after s", _key("trip_after_s")),
        *[(f"{phase} ms", _phase(phase)) for phase in PHASES[1:]],
        ("closed after outage s", _key("reclosed_after_s")),
        ("checkout call ms", _pair("checkout_start_p50_ms", "checkout_start_p99_ms")),
        ("outcomes", _key("statuses")),
    ]
    for title, _ in columns:
        table.add_column(title, justify="left" if title in ("resilience", "outcomes") else "right")
    for row in report.rows():
        table.add_row(*(render(row) for _, render in columns))
    table.caption = (
        "payment = authorize_payment attempts during the outage; terminal = from checkout to the saga's"
        " terminal state, for checkouts started in it; PSP writes/reads = POST/GET it received;"
        " undo refused = compensation attempts met by an open circuit;"
        " lookups refused = by the psp-reads breaker;"
        " detection / open / recovery = payment attempts that started between the outage's start and"
        " the first trip / the trip and the outage's end / after it, as `n (slow) p50 / p99`"
        f" (slow = at least {SLOW_ATTEMPT_S:g} s);"
        " checkout call = CheckoutService.start (what POST /v1/checkout waits for), p50 / p99"
    )
    return table


def breaker_command(
    outage_s: Annotated[float, typer.Option("--outage-s", help="How long the PSP is down")] = 30.0,
    rate: Annotated[float, typer.Option(help="Checkouts per second (open loop)")] = 10.0,
    duration_s: Annotated[
        float, typer.Option("--duration-s", help="Load duration; the outage is centred")
    ] = 60.0,
    drain_s: Annotated[
        float, typer.Option("--drain-s", help="Wait at most this long for sagas to finish")
    ] = 60.0,
    outage: Annotated[
        str, typer.Option(help="hang: requests never answered; error: answered 503 at once")
    ] = "hang",
    variants: Annotated[
        str, typer.Option(help="Comma-separated runs: on (own lookup breaker), shared, off")
    ] = ",".join(VARIANTS),
    plot: Annotated[Path, typer.Option(help="Where to write the PNG")] = Path("docs/lab/breaker.png"),
    database_url: Annotated[
        str | None, typer.Option(help="A PostgreSQL server URL for the shop (default: SQLite files)")
    ] = None,
    database_prefix: Annotated[
        str, typer.Option(help="Name prefix of the throwaway PostgreSQL databases")
    ] = "mercato_lab",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    breaker_probes: Annotated[
        int, typer.Option("--breaker-probes", help="Half-open probes of the PSP breaker")
    ] = _CHECKOUT_DEFAULTS.breaker_half_open_probes,
    breaker_consecutive_failures: Annotated[
        int,
        typer.Option("--breaker-consecutive-failures", help="Trip on this many failures in a row (0: off)"),
    ] = _CHECKOUT_DEFAULTS.breaker_consecutive_failures,
    breaker_minimum_calls: Annotated[
        int, typer.Option("--breaker-minimum-calls", help="Calls in the window before its rates count")
    ] = _CHECKOUT_DEFAULTS.breaker_minimum_calls,
    breaker_open_s: Annotated[
        float, typer.Option("--breaker-open-s", help="First open wait of the PSP breaker")
    ] = _CHECKOUT_DEFAULTS.breaker_open_s,
    breaker_max_open_s: Annotated[
        float,
        typer.Option("--breaker-max-open-s", help="Cap of the doubling open wait (<= open-s: no growth)"),
    ] = _CHECKOUT_DEFAULTS.breaker_max_open_s,
) -> None:
    """PSP outage under steady checkout load, with and without breaker + retry budget."""
    import orjson
    from rich.console import Console

    from mercato.kit.observability import configure_logging

    # Thousands of saga log lines would bury the result; warnings and errors still show.
    configure_logging(level="warning", fmt="console")
    console = Console(stderr=True)
    try:
        chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
        options = BreakerOptions(
            outage_s=outage_s,
            rate=rate,
            duration_s=duration_s,
            drain_s=drain_s,
            database_url=database_url,
            database_prefix=database_prefix,
            breaker_half_open_probes=breaker_probes,
            breaker_consecutive_failures=breaker_consecutive_failures,
            breaker_minimum_calls=breaker_minimum_calls,
            breaker_open_s=breaker_open_s,
            breaker_max_open_s=breaker_max_open_s,
            # Both are checked against their Literal by BreakerOptions.__post_init__.
            outage_mode=cast(OutageMode, outage),
            variants=cast(tuple[Variant, ...], chosen),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    # markup=False: "[on]"/"[off]" would otherwise be read as rich style tags and vanish.
    report = asyncio.run(run_experiment(options, on_progress=lambda line: console.print(line, markup=False)))
    written = plot_report(report, plot)
    if as_json:
        # The table still goes to stderr, so one run gives both the record and the reading.
        Console(width=400, stderr=True).print(report_table(report))
        body = {**report.to_dict(), "plot": str(written)}
        typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
    else:
        Console(width=400).print(report_table(report))
        console.print(f"plot: {written}")
