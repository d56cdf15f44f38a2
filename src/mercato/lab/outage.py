"""`mercato lab outage`: the API under steady load while its PostgreSQL goes away and comes back.

Hypothesis (issue 12 §2, ADR 0026): a dependency that is down is answered `503 dependency-unavailable` with
`Retry-After`, never 500; no answer takes longer than the request's deadline (a refused connection fails at
once, it does not queue); and when the server is back the service recovers by itself, within a couple of
seconds, without a restart.

Run: a private PostgreSQL 15 node (`mercato.cluster.PostgresNode`, a free port, a tmp folder), migrated and
seeded; `mercato api` against it as its own process. Paced clients send a steady mix of reads
(`GET /v1/products`, `GET /v1/products/{id}`) and writes (`PUT /v1/carts/me/items/{sku}` as logged-in
customers), each with `X-Request-Deadline`. After `warmup_s` the node is stopped (`pg_ctl stop -m fast`, or
`kill -9` with `--kill`) for `outage_s`, then started again; the load runs `after_s` more.

Reported: responses by status (and 503s by reason), 500s, 503s without Retry-After, the slowest answer
against the deadline, and recovery: from the moment the node accepts connections again to the last non-2xx
answer (every answer after it was a success); and per 250 ms of send time, the responses by status and their
p99 latency. Written through the shared harness (`mercato.bench.harness`) to the run folder
(`./lab-results/outage/<UTC time>/` or `--out`): `report.json`, `table.txt`, `verdict.txt` (the claim, each
of its checks with its numbers, and whether it held) and `outage.png` (drawn by `mercato.lab.outage_report`).
"""

from __future__ import annotations

import asyncio
import math
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.bench.servers import ServerProcess, migrate_and_seed, start_mercato
from mercato.cluster import PostgresNode
from mercato.lab.outage_report import plot_report, report_table, verdict_lines

__all__ = [
    "BUCKET_S",
    "RECOVERY_BOUND_S",
    "Check",
    "OutageOptions",
    "OutageReport",
    "Sample",
    "outage_command",
    "run_outage",
    "summarize",
]

NAME = "outage"
BUCKET_S = 0.25  # the figure's time resolution: a 10 s outage is 40 buckets
RECOVERY_BOUND_S = 5.0  # "recovers by itself": every answer a success within this long of the node's return


@dataclass(frozen=True)
class OutageOptions:
    outage_s: float = 10.0
    warmup_s: float = 4.0
    after_s: float = 8.0
    rate: float = 80.0  # requests per second, all clients together (at most)
    clients: int = 8
    write_share: float = 0.3
    deadline_s: float = 5.0
    kill: bool = False  # kill -9 instead of a fast shutdown
    workers: int = 1
    products: int = 200

    def __post_init__(self) -> None:
        if (
            min(self.outage_s, self.warmup_s, self.after_s, self.rate, self.deadline_s) <= 0
            or self.clients < 1
        ):
            raise ValueError("durations, rate and clients must be positive")


@dataclass
class Sample:
    sent_s: float  # since the load started
    latency_s: float
    status: int  # 0: no answer (transport error or client timeout)
    kind: str  # read | write
    reason: str = ""  # the 503's `reason`, or the transport error's name
    retry_after: bool = False


@dataclass(frozen=True)
class Check:
    """One part of the claim, with what was measured and the bound it must meet."""

    name: str
    measured: str
    bound: str
    held: bool


@dataclass
class OutageReport:
    options: dict[str, Any]
    down_at_s: float
    up_at_s: float
    samples: int
    duration_s: float  # first request sent -> last answer
    achieved_rate: float  # responses per second over duration_s (paced clients wait for answers)
    by_status: dict[str, int]
    by_reason: dict[str, int]
    errors_500: int
    unavailable_without_retry_after: int
    no_answer: int
    max_latency_s: float
    max_latency_during_outage_s: float
    recovery_s: float | None  # node accepting again -> last non-2xx
    first_success_after_up_s: float | None
    served_during_outage: int
    bucket_s: float = BUCKET_S
    slowest: list[dict[str, Any]] = field(default_factory=list)
    # Per BUCKET_S of send time: {"t_s": start, "by_status": {"200": n, ...}, "p99_s": latency}.
    buckets: list[dict[str, Any]] = field(default_factory=list)

    def checks(self) -> list[Check]:
        """The claim, part by part; `ok` and the verdict both read it, so they cannot disagree."""
        deadline_s = float(self.options["deadline_s"])
        unavailable = self.by_status.get("503", 0)
        others = {k: v for k, v in self.by_status.items() if k not in ("200", "503")}
        recovered = "never" if self.recovery_s is None else f"{self.recovery_s:g} s"
        return [
            Check("outage seen (503s)", f"{unavailable:,}", "> 0", unavailable > 0),
            Check("500s", f"{self.errors_500:,} of {self.samples:,}", "0", self.errors_500 == 0),
            Check(
                "503s without Retry-After",
                f"{self.unavailable_without_retry_after:,} of {unavailable:,}",
                "0",
                self.unavailable_without_retry_after == 0,
            ),
            Check(
                "other answers (not 200/503, or none)",
                ", ".join(f"{k}: {v}" for k, v in others.items()) or "0",
                "0",
                not others and self.no_answer == 0,
            ),
            Check(
                "slowest answer",
                f"{self.max_latency_s:g} s (during the outage {self.max_latency_during_outage_s:g} s)",
                f"<= deadline {deadline_s:g} s",
                self.max_latency_s <= deadline_s,
            ),
            Check(
                "recovery (node back -> last non-2xx)",
                recovered,
                f"<= {RECOVERY_BOUND_S:g} s, no restart",
                self.recovery_s is not None and self.recovery_s <= RECOVERY_BOUND_S,
            ),
        ]

    @property
    def ok(self) -> bool:
        return all(check.held for check in self.checks())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _Load:
    """Paced clients: each sends at most one request per `clients / rate` seconds, one at a time."""

    def __init__(
        self, base_url: str, options: OutageOptions, skus: list[str], product_ids: list[str]
    ) -> None:
        self.base_url = base_url
        self.options = options
        self.skus = skus
        self.product_ids = product_ids
        self.samples: list[Sample] = []
        self.stop = asyncio.Event()
        self.started = 0.0

    async def run(self, tokens: list[str]) -> None:
        limits = httpx.Limits(max_connections=self.options.clients * 4)
        timeout = httpx.Timeout(self.options.deadline_s + 2.0)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=timeout) as client:
            self.started = time.perf_counter()
            interval_s = self.options.clients / self.options.rate
            await asyncio.gather(
                *(
                    self._client(client, tokens[i % len(tokens)], interval_s, random.Random(i))
                    for i in range(self.options.clients)
                )
            )

    async def _client(
        self, client: httpx.AsyncClient, token: str, interval_s: float, rng: random.Random
    ) -> None:
        # Paced closed loop: one request in flight per client, sent on schedule once the last one has
        # answered; a late answer moves the schedule rather than bunching requests up. On a shared
        # machine an open loop measured the generator's own backlog (seconds) instead of the server.
        next_s = time.perf_counter() + rng.uniform(0, interval_s)
        while not self.stop.is_set():
            await asyncio.sleep(max(0.0, next_s - time.perf_counter()))
            next_s = max(next_s + interval_s, time.perf_counter())
            await self._one(client, token, rng)

    async def _one(self, client: httpx.AsyncClient, token: str, rng: random.Random) -> None:
        headers = {"X-Request-Deadline": str(int(self.options.deadline_s * 1000))}
        write = rng.random() < self.options.write_share
        sent = time.perf_counter()
        try:
            if write:
                sku = rng.choice(self.skus)
                response = await client.put(
                    f"/v1/carts/me/items/{sku}",
                    json={"quantity": rng.randint(1, 5)},
                    headers={**headers, "Authorization": f"Bearer {token}"},
                )
            elif rng.random() < 0.5:
                response = await client.get("/v1/products", params={"limit": 20}, headers=headers)
            else:
                response = await client.get(f"/v1/products/{rng.choice(self.product_ids)}", headers=headers)
        except httpx.HTTPError as exc:
            self.samples.append(
                Sample(
                    sent - self.started,
                    time.perf_counter() - sent,
                    0,
                    "write" if write else "read",
                    type(exc).__name__,
                )
            )
            return
        latency_s = time.perf_counter() - sent
        reason = ""
        if response.status_code >= 400:
            try:
                problem = response.json()
                reason = str(problem.get("reason") or problem.get("type", ""))
            except ValueError:
                reason = "not-json"
        self.samples.append(
            Sample(
                sent - self.started,
                latency_s,
                response.status_code,
                "write" if write else "read",
                reason,
                "retry-after" in response.headers,
            )
        )


async def _customers(base_url: str, count: int) -> list[str]:
    tokens = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        for i in range(count):
            email, password = f"outage-{i}-{time.time_ns()}@example.com", "outage-password-123"
            registered = await client.post("/v1/auth/register", json={"email": email, "password": password})
            registered.raise_for_status()
            login = await client.post("/v1/auth/login", json={"email": email, "password": password})
            login.raise_for_status()
            tokens.append(str(login.json()["access_token"]))
    return tokens


async def _catalog(base_url: str) -> tuple[list[str], list[str]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        page = (await client.get("/v1/products", params={"limit": 100})).json()["items"]
    # A handful of SKUs for the cart writes: a cart holds a bounded number of lines (422 cart-full).
    return [p["sku"] for p in page][:5], [p["id"] for p in page]


def summarize(
    answers: list[Sample], options: OutageOptions, down_at_s: float, up_at_s: float
) -> OutageReport:
    """The report from the load's samples and the outage window (seconds since the load started)."""
    samples = sorted(answers, key=lambda s: s.sent_s + s.latency_s)
    by_status = Counter(str(s.status) for s in samples)
    by_reason = Counter(f"{s.status} {s.reason}" for s in samples if s.status >= 400)
    during = [s for s in samples if down_at_s <= s.sent_s <= up_at_s]
    after = [s for s in samples if s.sent_s + s.latency_s >= up_at_s]
    failures_after = [s for s in after if not 200 <= s.status < 300]
    successes_after = [s for s in after if 200 <= s.status < 300]
    recovery_s: float | None = None
    if successes_after:
        last_failure_s = max((s.sent_s + s.latency_s for s in failures_after), default=up_at_s)
        recovery_s = round(max(0.0, last_failure_s - up_at_s), 3)
    ends = [s.sent_s + s.latency_s for s in samples]
    duration_s = max(ends, default=0.0) - min((s.sent_s for s in samples), default=0.0)
    return OutageReport(
        options=asdict(options),
        down_at_s=round(down_at_s, 3),
        up_at_s=round(up_at_s, 3),
        samples=len(samples),
        duration_s=round(duration_s, 3),
        achieved_rate=round(len(samples) / duration_s, 1) if duration_s > 0 else 0.0,
        by_status=dict(sorted(by_status.items())),
        by_reason=dict(sorted(by_reason.items())),
        errors_500=sum(1 for s in samples if s.status == 500),
        unavailable_without_retry_after=sum(1 for s in samples if s.status == 503 and not s.retry_after),
        no_answer=by_status.get("0", 0),
        max_latency_s=round(max((s.latency_s for s in samples), default=0.0), 4),
        max_latency_during_outage_s=round(max((s.latency_s for s in during), default=0.0), 4),
        recovery_s=recovery_s,
        first_success_after_up_s=(
            round(min(s.sent_s + s.latency_s for s in successes_after) - up_at_s, 3)
            if successes_after
            else None
        ),
        served_during_outage=sum(1 for s in during if 200 <= s.status < 300),
        slowest=[asdict(s) for s in sorted(samples, key=lambda s: -s.latency_s)[:8]],
        buckets=_buckets(samples),
    )


def _p99(values: list[float]) -> float:
    """Nearest-rank p99 (a bucket holds ~20 answers: its p99 is its slowest but one in a hundred)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _buckets(samples: list[Sample]) -> list[dict[str, Any]]:
    """Responses by status and their p99 latency per BUCKET_S of send time, empty buckets included."""
    grouped: dict[int, list[Sample]] = {}
    for s in samples:
        grouped.setdefault(int(s.sent_s // BUCKET_S), []).append(s)
    if not grouped:
        return []
    return [
        {
            "t_s": round(index * BUCKET_S, 3),
            "by_status": dict(sorted(Counter(str(s.status) for s in grouped.get(index, [])).items())),
            "p99_s": round(_p99([s.latency_s for s in grouped[index]]), 4) if index in grouped else None,
        }
        for index in range(min(grouped), max(grouped) + 1)
    ]


async def _drive(node: PostgresNode, server: ServerProcess, options: OutageOptions, log: Any) -> OutageReport:
    tokens = await _customers(server.base_url, min(options.clients, 6))
    skus, product_ids = await _catalog(server.base_url)
    load = _Load(server.base_url, options, skus, product_ids)
    runner = asyncio.create_task(load.run(tokens))
    await asyncio.sleep(options.warmup_s)
    down_at_s = time.perf_counter() - load.started
    log(f"stopping PostgreSQL ({'kill -9' if options.kill else 'fast shutdown'}) for {options.outage_s} s")
    await asyncio.to_thread(node.kill if options.kill else node.stop)
    await asyncio.sleep(options.outage_s)
    await asyncio.to_thread(node.start)
    up_at_s = time.perf_counter() - load.started
    log(f"PostgreSQL accepting connections again at t={up_at_s:.1f}s")
    await asyncio.sleep(options.after_s)
    load.stop.set()
    await runner
    return summarize(load.samples, options, down_at_s, up_at_s)


def run_outage(options: OutageOptions, *, workdir: Path | None = None, log: Any = print) -> OutageReport:
    """Run the experiment end to end (node, API process, load) and tear everything down."""
    with tempfile.TemporaryDirectory(prefix="mercato-outage-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        node = PostgresNode.create()
        server: ServerProcess | None = None
        try:
            url = node.create_database("mercato")
            migrate_and_seed(url, work, products=options.products)
            server = start_mercato(
                database_url=url,
                workdir=work,
                workers=options.workers,
                settings_env={
                    "MERCATO_AUTH_ARGON2_TIME_COST": "1",
                    "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
                    "MERCATO_RATELIMIT_ENABLED": "false",
                    "MERCATO_DATABASE_POOL_SIZE": "10",
                },
            )
            log(f"API on {server.base_url}, PostgreSQL node on port {node.port}")
            return asyncio.run(_drive(node, server, options, log))
        finally:
            if server is not None:
                server.stop()
            node.destroy()


def outage_command(
    outage_s: Annotated[float, typer.Option("--outage-s", help="How long PostgreSQL is down")] = 10.0,
    warmup_s: Annotated[float, typer.Option("--warmup-s", help="Load before the outage")] = 4.0,
    after_s: Annotated[float, typer.Option("--after-s", help="Load after PostgreSQL is back")] = 8.0,
    rate: Annotated[float, typer.Option(help="Requests per second, all clients together")] = 80.0,
    clients: Annotated[int, typer.Option(help="Concurrent paced clients")] = 8,
    deadline_s: Annotated[
        float, typer.Option("--deadline-s", help="X-Request-Deadline of every request")
    ] = 5.0,
    kill: Annotated[
        bool, typer.Option("--kill", help="kill -9 the server instead of a fast shutdown")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """PostgreSQL stopped under load: 0 answers 500, every failure a 503 with Retry-After, self-recovery."""
    import orjson
    from rich.console import Console

    console = Console(stderr=True)
    try:
        options = OutageOptions(
            outage_s=outage_s,
            warmup_s=warmup_s,
            after_s=after_s,
            rate=rate,
            clients=clients,
            deadline_s=deadline_s,
            kill=kill,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if update_docs:
        check_docs_target(NAME)
    report = run_outage(options, log=console.print)
    run = RunFolder.open(NAME, out)
    plot_report(report, run.figure)
    verdict = verdict_lines(report)
    if as_json:
        # The table still goes to stderr, so one run gives both the record and the reading.
        Console(stderr=True).print(report_table(report))
        typer.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        Console().print(report_table(report))
        for line in verdict:
            console.print(line, markup=False)
    run.record(
        data=report.to_dict(),
        tables=[report_table(report)],
        verdict=verdict,
        update_docs=update_docs,
        console=console,
    )
    if not report.ok:
        raise typer.Exit(1)
