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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

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
from mercato.kit.messaging import Consumer, Inbox, Message
from mercato.kit.messaging.tables import outbox, stream_log
from mercato.kit.sagas.store import ACTIVE, saga_instances
from mercato.kit.storage.migrations import upgrade
from mercato.lab.chaos_invariants import (
    CheckoutAttempt,
    Evidence,
    LedgerEntry,
    OrderRecord,
    OutboxRecord,
    SagaRecord,
    ShipmentRecord,
    StockRecord,
    StreamRecord,
    Verdict,
    check_all,
)
from mercato.providers.config import ProviderSettings
from mercato.shop.identity.contracts import Role
from mercato.shop.inventory.tables import reservations, stock
from mercato.shop.orders.tables import order_lines, orders

__all__ = ["ChaosConfig", "ChaosReport", "run_chaos"]

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_SECRET = "chaos-run-secret-that-is-long-enough-0123456789"  # noqa: S105 - a throwaway test shop's key
_PASSWORD = "chaos-customer-password-1"  # noqa: S105 - throwaway accounts of a throwaway database
_TERMINAL = ("completed", "compensated", "failed")

Log = Callable[[str], None]


@dataclass(frozen=True)
class ChaosConfig:
    checkouts: int = 50
    kills: int = 5
    # "sqlite" | "postgresql"; `database_url` overrides: a PostgreSQL server URL (a fresh database
    # is created on it and dropped afterwards) or a SQLite URL used as is (it should be new).
    backend: str = "sqlite"
    database_url: str | None = None
    concurrency: int = 8
    skus: int = 6
    # Below the expected demand, so some checkouts are cancelled for want of stock.
    stock_per_sku: int = 15
    max_lines: int = 2
    max_quantity: int = 2
    # Share of checkouts paying with the PSP's always-declined test card.
    decline_share: float = 0.05
    # Share of answered checkouts re-sent with the same key (a client that lost the 202).
    resend_share: float = 0.1
    psp_error_rate: float = 0.30
    psp_hang_rate: float = 0.10
    psp_lost_response_rate: float = 0.05
    carrier_error_rate: float = 0.10
    # Short timeouts and deadline so a hang costs half a second and a run finishes quickly.
    provider_timeout_s: float = 0.5
    provider_attempts: int = 4
    saga_deadline_s: float = 30.0
    saga_lease_s: float = 2.0
    # Checkout arrivals are spread over at least this long, so kills land among running sagas.
    drive_s: float = 15.0
    kill_gap_s: tuple[float, float] = (1.0, 3.0)
    # How long the worker stays dead before its restart.
    down_s: tuple[float, float] = (0.0, 1.0)
    seed: int = 7
    workdir: Path | None = None
    pg_admin_dsn: str = PG_ADMIN_DSN

    @property
    def bound_s(self) -> float:
        """Start to terminal: the deadline, then the compensations (retried through the same
        faults) and a lease or two lost to kills."""
        return self.saga_deadline_s + 30.0 + 4 * self.saga_lease_s

    @property
    def settle_timeout_s(self) -> float:
        return self.bound_s + 40.0


@dataclass
class ChaosReport:
    backend: str
    checkouts: int
    kills: int
    duration_s: float
    settled: bool
    verdicts: list[Verdict]
    counts: dict[str, int]
    workdir: str
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.settled and all(v.ok for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "ok": self.ok,
            "checkouts": self.checkouts,
            "kills": self.kills,
            "duration_s": round(self.duration_s, 1),
            "settled": self.settled,
            "counts": self.counts,
            "invariants": [
                {
                    "name": v.name,
                    "ok": v.ok,
                    "checked": v.checked,
                    "violations": v.violations,
                    "details": v.details,
                }
                for v in self.verdicts
            ],
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Process:
    """One `mercato ...` subprocess with its own log file; restartable."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts + 1} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "mercato.cli.main", *self.args],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no lease release, no flush — a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


async def _wait_http(process: _Process, url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if not process.alive:
                raise RuntimeError(f"{process.name} exited early:\n{process.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{process.name} did not become ready:\n{process.tail()}")


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
    name = f"mercato_chaos_{uuid.uuid4().hex[:12]}"
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
            "MERCATO_AUTH_SECRET": _SECRET,
            "MERCATO_AUTH_ARGON2_TIME_COST": "1",
            "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
            "MERCATO_PROVIDERS_PSP_PORT": str(psp_port),
            "MERCATO_PROVIDERS_CARRIER_PORT": str(carrier_port),
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
        auth=AuthSettings(secret=_SECRET, argon2_time_cost=1, argon2_memory_kib=8192),  # type: ignore[arg-type]
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
        await container.identity.create_user(email, _PASSWORD, role=Role.CUSTOMER)
    return initial, emails


def _retryable(response: httpx.Response) -> bool:
    """5xx (a shed or failed request) and 429 (rate limited) may succeed later."""
    return response.status_code >= 500 or response.status_code == 429


def _backoff_s(attempt: int, response: httpx.Response | None) -> float:
    """Honour Retry-After (capped: the run has a budget), else exponential from 50 ms."""
    header = response.headers.get("retry-after") if response is not None else None
    if header is not None and header.isdigit():
        return min(float(header), 5.0)
    return min(2.0, 0.05 * 2.0**attempt)


@dataclass
class _Driver:
    """Drives checkouts over HTTP as `concurrency` customers, each one checkout at a time."""

    base_url: str
    config: ChaosConfig
    skus: list[str]
    rng: random.Random
    attempts: list[CheckoutAttempt] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    async def run(self, emails: list[str], on_done: Callable[[], None]) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(self.config.checkouts):
            queue.put_nowait(n)
        started = time.monotonic()
        spacing_s = self.config.drive_s / max(self.config.checkouts, 1)
        limits = httpx.Limits(max_connections=self.config.concurrency * 2)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10.0, limits=limits) as client:

            async def customer(email: str) -> None:
                token = await self._login(client, email)
                while True:
                    try:
                        n = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    # Arrivals are paced so checkouts keep starting while the worker is killed.
                    await asyncio.sleep(max(0.0, started + n * spacing_s - time.monotonic()))
                    attempt = await self._checkout(client, token, n)
                    if attempt is None:  # the token expired: log in again and retry this one
                        token = await self._login(client, email)
                        attempt = await self._checkout(client, token, n)
                    if attempt is not None:
                        self.attempts.append(attempt)
                    on_done()

            await asyncio.gather(*(customer(email) for email in emails))

    async def _request(
        self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
    ) -> httpx.Response:
        """Transport errors and 5xx are retried: these calls (login, cart edits) are idempotent."""
        for attempt in range(10):
            try:
                response = await client.request(method, url, **kwargs)
            except httpx.TransportError:
                self.stats["transport_errors"] += 1
            else:
                if not _retryable(response):
                    return response
                self.stats[f"status_{response.status_code}"] += 1
                await asyncio.sleep(_backoff_s(attempt, response))
                continue
            await asyncio.sleep(_backoff_s(attempt, None))
        raise RuntimeError(f"{method} {url} kept failing")

    async def _login(self, client: httpx.AsyncClient, email: str) -> str:
        response = await self._request(
            client, "POST", "/v1/auth/login", json={"email": email, "password": _PASSWORD}
        )
        if response.status_code != 200:
            raise RuntimeError(f"login failed: {response.status_code} {response.text}")
        return str(response.json()["access_token"])

    async def _checkout(self, client: httpx.AsyncClient, token: str, n: int) -> CheckoutAttempt | None:
        auth = {"Authorization": f"Bearer {token}"}
        cleared = await self._request(client, "DELETE", "/v1/carts/me", headers=auth)
        if cleared.status_code == 401:
            return None
        for sku in self.rng.sample(
            self.skus, self.rng.randint(1, min(self.config.max_lines, len(self.skus)))
        ):
            put = await self._request(
                client,
                "PUT",
                f"/v1/carts/me/items/{sku}",
                json={"quantity": self.rng.randint(1, self.config.max_quantity)},
                headers=auth,
            )
            if put.status_code != 200:
                raise RuntimeError(f"cart line refused: {put.status_code} {put.text}")
        body = {"card_token": "tok_decline"} if self.rng.random() < self.config.decline_share else {}
        key = f"chaos-{n}-{uuid.uuid4().hex}"
        headers = {**auth, "Idempotency-Key": key}
        order_ids: list[str] = []
        answered = False
        posts = 0
        resend = self.rng.random() < self.config.resend_share
        for attempt in range(12):
            posts += 1
            try:
                response = await client.post("/v1/checkout", json=body, headers=headers)
            except httpx.TransportError:
                self.stats["checkout_transport_errors"] += 1
                await asyncio.sleep(_backoff_s(attempt, None))
                continue
            if response.status_code == 202:
                answered = True
                order_ids.append(str(response.json()["order_id"]))
                if response.headers.get("idempotent-replayed") == "true":
                    self.stats["replayed"] += 1
                if resend:  # the same key again: must replay the same order, never make a second
                    resend = False
                    self.stats["resent"] += 1
                    continue
                break
            if _retryable(response) or response.status_code == 409:  # 409: the first is in flight
                self.stats[f"checkout_{response.status_code}"] += 1
                await asyncio.sleep(_backoff_s(attempt, response))
                continue
            if response.status_code == 401:
                return None
            answered = True
            self.stats[f"checkout_{response.status_code}"] += 1
            break
        return CheckoutAttempt(key=key, order_ids=tuple(order_ids), answered=answered, posts=posts)


_WORKER_READY = b"Mercato worker running"


async def _wait_worker_ready(worker: _Process, timeout_s: float = 60.0) -> None:
    """Until this start of the worker printed its banner (imports done, container built, about to
    run): a kill before that would only interrupt Python's start-up, not the worker's work."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.log.read_bytes().count(_WORKER_READY) >= worker.starts:
            return
        if not worker.alive:
            raise RuntimeError(f"worker exited:\n{worker.tail()}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"worker did not start:\n{worker.tail()}")


async def _killer(
    worker: _Process, config: ChaosConfig, rng: random.Random, log: Log, kill_times: list[float]
) -> None:
    """SIGKILL the running worker `kills` times, each at a random moment after it got going."""
    started = time.monotonic()
    for n in range(config.kills):
        await _wait_worker_ready(worker)
        await asyncio.sleep(rng.uniform(*config.kill_gap_s))
        worker.kill()
        kill_times.append(time.monotonic() - started)
        log(f"worker SIGKILLed ({n + 1}/{config.kills}) at {kill_times[-1]:.1f} s")
        await asyncio.sleep(rng.uniform(*config.down_s))
        worker.start()
    await _wait_worker_ready(worker)


async def _pending(container: Container) -> tuple[int, int]:
    """Sagas not yet terminal, and outbox rows not yet published."""
    async with container.db.read() as conn:
        sagas = (
            await conn.execute(
                select(func.count()).select_from(saga_instances).where(saga_instances.c.status.in_(ACTIVE))
            )
        ).scalar_one()
        unpublished = (
            await conn.execute(
                select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
            )
        ).scalar_one()
    return int(sagas), int(unpublished)


async def _settle(container: Container, timeout_s: float, log: Log) -> bool:
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    while time.monotonic() < deadline:
        try:
            sagas, unpublished = await _pending(container)
        except DBAPIError:  # a failover drill (`lab failover`): the pool reconnects on the next try
            await asyncio.sleep(0.5)
            continue
        if sagas == 0 and unpublished == 0:
            return True
        if time.monotonic() - last_report > 5.0:
            log(f"waiting: {sagas} sagas active, {unpublished} outbox rows unpublished")
            last_report = time.monotonic()
        await asyncio.sleep(0.5)
    return False


async def _downstream(container: Container) -> tuple[dict[str, int], int]:
    """Consume every topic from the start with a fresh group through the inbox: how many times each
    message id was applied (must be once), and how many deliveries that took."""
    async with container.db.read() as conn:
        topics = sorted({str(t) for t in (await conn.execute(select(outbox.c.topic).distinct())).scalars()})
    applied: Counter[str] = Counter()

    async def record(conn: AsyncConnection, message: Message) -> None:
        applied[str(message.id)] += 1

    group = f"chaos-audit-{uuid.uuid4().hex[:8]}"
    deliveries = 0
    for topic in topics:
        consumer = Consumer(
            container.db,
            container.stream,
            topic=topic,
            group=group,
            name="auditor",
            handler=record,
            max_messages=500,
            inbox_store=Inbox(clock=container.clock),
        )
        while handled := await consumer.run_once():
            deliveries += handled
    return dict(applied), deliveries


async def _ledger(container: Container) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    cursor: str | None = None
    while True:
        page = await container.psp.ledger(limit=100, cursor=cursor)
        entries.extend(
            LedgerEntry(
                kind=e.kind.value,
                order_reference=e.order_reference,
                authorization_id=e.authorization_id,
                capture_id=e.capture_id,
                amount_minor=e.amount_minor,
            )
            for e in page.items
        )
        if page.next_cursor is None:
            return entries
        cursor = page.next_cursor


async def _shipments(container: Container) -> list[ShipmentRecord]:
    records: list[ShipmentRecord] = []
    cursor: str | None = None
    while True:
        page = await container.carrier.shipments(limit=100, cursor=cursor)
        records.extend(
            ShipmentRecord(
                shipment_id=s.shipment_id, order_reference=s.order_reference, status=s.status.value
            )
            for s in page.items
        )
        if page.next_cursor is None:
            return records
        cursor = page.next_cursor


async def _evidence(
    container: Container, initial: dict[str, int], attempts: list[CheckoutAttempt], bound_s: float
) -> tuple[Evidence, int]:
    async with container.db.read() as conn:
        lines: dict[str, list[tuple[str, int]]] = {}
        for row in await conn.execute(
            select(order_lines.c.order_id, order_lines.c.sku, order_lines.c.quantity)
        ):
            lines.setdefault(str(row.order_id), []).append((str(row.sku), int(row.quantity)))
        order_rows = [
            OrderRecord(
                order_id=str(r.id),
                status=str(r.status),
                total_minor=int(r.total_minor),
                lines=tuple(lines.get(str(r.id), [])),
            )
            for r in await conn.execute(select(orders.c.id, orders.c.status, orders.c.total_minor))
        ]
        saga_rows = [
            SagaRecord(
                saga_id=str(r.id),
                status=str(r.status),
                failure=r.failure,
                created_at=r.created_at,
                finished_at=r.finished_at,
            )
            for r in await conn.execute(select(saga_instances))
        ]
        stock_rows = [
            StockRecord(
                sku=str(r.sku),
                initial=initial.get(str(r.sku), 0),
                available=int(r.available),
                reserved=int(r.reserved),
                committed=int(r.committed),
            )
            for r in await conn.execute(select(stock))
        ]
        active = (
            await conn.execute(
                select(func.count()).select_from(reservations).where(reservations.c.status == "active")
            )
        ).scalar_one()
        outbox_rows = [
            OutboxRecord(
                message_id=str(r.id),
                type=str(r.type),
                subject=str(r.key),
                published=r.published_at is not None,
            )
            for r in await conn.execute(
                select(outbox.c.id, outbox.c.type, outbox.c.key, outbox.c.published_at)
            )
        ]
        log_rows = []
        for r in await conn.execute(select(stream_log.c.message_id, stream_log.c.envelope)):
            message = Message.from_json(r.envelope)
            log_rows.append(
                StreamRecord(message_id=str(r.message_id), type=message.type, subject=message.subject)
            )
    applied, deliveries = await _downstream(container)
    evidence = Evidence(
        orders=order_rows,
        sagas=saga_rows,
        ledger=await _ledger(container),
        shipments=await _shipments(container),
        stock=stock_rows,
        outbox=outbox_rows,
        stream_log=log_rows,
        downstream_applied=applied,
        checkouts=attempts,
        active_reservations=int(active),
        bound_s=bound_s,
    )
    return evidence, deliveries


def _counts(evidence: Evidence, driver: _Driver, kills: int, deliveries: int) -> dict[str, int]:
    order_status = Counter(o.status for o in evidence.orders)
    saga_status = Counter(s.status for s in evidence.sagas)
    ledger = Counter(e.kind for e in evidence.ledger)
    shipments = Counter(s.status for s in evidence.shipments)
    attempts = driver.attempts
    counts = {
        "checkouts_driven": len(attempts),
        "checkouts_accepted": sum(1 for a in attempts if a.order_ids),
        "checkouts_refused": sum(1 for a in attempts if a.answered and not a.order_ids),
        "checkouts_unanswered": sum(1 for a in attempts if not a.answered),
        "checkout_posts": sum(a.posts for a in attempts),
        "worker_kills": kills,
        "orders": len(evidence.orders),
        "orders_completed": order_status["completed"],
        "orders_cancelled": order_status["cancelled"],
        "orders_other": len(evidence.orders) - order_status["completed"] - order_status["cancelled"],
        "sagas_completed": saga_status["completed"],
        "sagas_compensated": saga_status["compensated"],
        "sagas_failed": saga_status["failed"],
        "sagas_active": sum(n for s, n in saga_status.items() if s not in _TERMINAL),
        "psp_authorizations": ledger["authorization"],
        "psp_declines": ledger["decline"],
        "psp_captures": ledger["capture"],
        "psp_voids": ledger["void"],
        "psp_refunds": ledger["refund"],
        "shipments_created": len(evidence.shipments),
        "shipments_cancelled": shipments["cancelled"],
        "outbox_messages": len(evidence.outbox),
        "stream_messages": len(evidence.stream_log),
        "downstream_deliveries": deliveries,
        "downstream_applied": sum(evidence.downstream_applied.values()),
    }
    counts.update({f"client_{k}": v for k, v in sorted(driver.stats.items())})
    return counts


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
        processes: list[_Process] = []
        try:
            initial, emails = await _seed(container, config)
            say(f"seeded {len(initial)} SKUs × {config.stock_per_sku} units, {len(emails)} customers")
            bare_env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
            psp = _Process(
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
            carrier = _Process(
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
            api = _Process(
                "api", ["api", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"], env, workdir
            )
            worker = _Process("worker", ["worker"], env, workdir)
            processes.extend([psp, carrier, api, worker])
            for process in (psp, carrier, api):
                process.start()
            await _wait_http(psp, f"http://127.0.0.1:{psp_port}/healthz")
            await _wait_http(carrier, f"http://127.0.0.1:{carrier_port}/healthz")
            await _wait_http(api, f"http://127.0.0.1:{api_port}/startupz")
            worker.start()
            say(f"processes up in {workdir}: psp :{psp_port}, carrier :{carrier_port}, api :{api_port}")

            driver = _Driver(
                f"http://127.0.0.1:{api_port}", config, sorted(initial), random.Random(rng.random())
            )
            kill_times: list[float] = []
            await asyncio.gather(
                driver.run(emails, on_checkout or (lambda: None)),
                _killer(worker, config, random.Random(rng.random()), say, kill_times),
            )
            say(f"{len(driver.attempts)} checkouts driven, {len(kill_times)} kills; settling")
            settled = await _settle(container, config.settle_timeout_s, say)
            worker.stop()
            api.stop()
            evidence, deliveries = await _evidence(container, initial, driver.attempts, config.bound_s)
            verdicts = check_all(evidence)
            logs = {p.name: p.tail() for p in processes}
            return ChaosReport(
                backend=backend,
                checkouts=config.checkouts,
                kills=len(kill_times),
                duration_s=time.monotonic() - started,
                settled=settled,
                verdicts=verdicts,
                counts=_counts(evidence, driver, len(kill_times), deliveries),
                workdir=str(workdir),
                logs=logs,
            )
        finally:
            for process in reversed(processes):
                process.stop()
            await container.close()
