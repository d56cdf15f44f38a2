"""`mercato lab partition`: an API process cut off from its primary database (guide §34, CAP).

The claim (docs/consistency.md, "Under a partition"): the shop picks a stance per domain. CP
operations (cart and stock changes, checkout, payments) refuse rather than risk a wrong answer: a
`503 dependency-unavailable` with `Retry-After` within one second. AP operations (catalog reads
from the cache) keep answering, saying how stale they are (`Mercato-Staleness`). When the partition
heals, everything converges: the writes the client retried with their `Idempotency-Key` are
applied exactly once, and fresh reads come back.

The partition is real, on this machine only: the lab makes a network namespace (`ip netns`) with
two veth pairs, one for the client's requests and one for the API's database traffic, runs
`mercato api` inside it against a private PostgreSQL reachable only over the database pair, and
takes the host end of that pair down (packets dropped silently, the way a partition looks: no
refused connection, no reset). It always removes the namespace and the links, whatever happens.
Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.bench.servers import migrate_and_seed
from mercato.cluster import PostgresNode
from mercato.cluster.processes import wait_until

__all__ = ["PartitionConfig", "PartitionReport", "Sample", "partition_command", "run_partition"]

_console = Console(stderr=True)

NS = "hel_part"
CLIENT_HOST, CLIENT_NS = "10.251.1.1", "10.251.1.2"
DB_HOST, DB_NS = "10.251.2.1", "10.251.2.2"
LINKS = {
    "client": ("hel_pc0", "hel_pc1", CLIENT_HOST, CLIENT_NS),
    "db": ("hel_pd0", "hel_pd1", DB_HOST, DB_NS),
}
CP_BOUND_S = 1.0
# Requests sent this soon after the cut were already waiting on the dead link when it was detected
# (the probes' bound, about failures × (interval + timeout)); they are reported apart, and must also
# answer within CP_BOUND_S (a silent probe corroborated by their own stuck statement: ADR 0057).
DETECT_BOUND_S = 1.5
IP = shutil.which("ip") or "/usr/sbin/ip"


@dataclass(frozen=True)
class PartitionConfig:
    partition_s: float = 8.0
    heal_s: float = 12.0
    interval_s: float = 0.25
    client_timeout_s: float = 5.0
    api_port: int = 24170
    out: Path = Path("lab-results/partition")


@dataclass
class Sample:
    op: str
    stance: str
    phase: str
    t: float
    latency_s: float
    status: int  # 0: no answer within the client's timeout
    retry_after: bool = False
    staleness_s: int | None = None
    replayed: bool = False


@dataclass
class PartitionReport:
    samples: list[Sample] = field(default_factory=list)
    cut_at: float = 0.0
    cut_wall: float = 0.0
    healed_at: float = 0.0
    orders_after: int = 0
    checkout_keys_accepted: int = 0
    first_cp_success_after_heal_s: float | None = None
    first_fresh_read_after_heal_s: float | None = None

    def during(self, stance: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == "partition" and s.stance == stance]

    def cp_after_detection(self) -> list[Sample]:
        return [s for s in self.during("CP") if s.t >= self.cut_at + DETECT_BOUND_S]

    def cp_at_cut(self) -> list[Sample]:
        return [s for s in self.during("CP") if s.t < self.cut_at + DETECT_BOUND_S]

    @property
    def cp_fast_503(self) -> int:
        return sum(
            1
            for s in self.cp_after_detection()
            if s.status == 503 and s.retry_after and s.latency_s <= CP_BOUND_S
        )

    @property
    def cp_at_cut_fast_503(self) -> int:
        return sum(
            1 for s in self.cp_at_cut() if s.status == 503 and s.retry_after and s.latency_s <= CP_BOUND_S
        )

    @property
    def ap_served_stale(self) -> int:
        return sum(1 for s in self.during("AP") if s.status == 200 and s.staleness_s is not None)

    @property
    def held(self) -> bool:
        cp, ap = self.during("CP"), self.during("AP")
        after = self.cp_after_detection()
        return (
            bool(cp)
            and bool(after)
            and self.cp_fast_503 == len(after)
            and self.cp_at_cut_fast_503 == len(self.cp_at_cut())
            and all(s.status == 503 and s.retry_after for s in cp)
            and bool(ap)
            and self.ap_served_stale == len(ap)
            and self.orders_after == self.checkout_keys_accepted == 1
            and self.first_cp_success_after_heal_s is not None
        )


def _ip(*args: str, ns: bool = False) -> None:
    argv = [IP, "netns", "exec", NS, IP, *args] if ns else [IP, *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=10)  # noqa: S603 - fixed argv


@contextlib.contextmanager
def network_namespace() -> Iterator[None]:
    """The namespace and its two veth pairs (/30 each), removed on exit whatever happened."""
    _cleanup()
    try:
        _ip("netns", "add", NS)
        _ip("link", "set", "lo", "up", ns=True)
        for host_if, ns_if, host_ip, ns_ip in LINKS.values():
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", NS)
            _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            _ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, ns=True)
            _ip("link", "set", host_if, "up")
            _ip("link", "set", ns_if, "up", ns=True)
        yield
    finally:
        _cleanup()


def _cleanup() -> None:
    for args in (["netns", "del", NS], *(["link", "del", host_if] for host_if, *_ in LINKS.values())):
        subprocess.run([IP, *args], capture_output=True, timeout=10, check=False)  # noqa: S603


def set_partition(cut: bool) -> None:
    """Take the host end of the database pair down (cut) or up (heal)."""
    _ip("link", "set", LINKS["db"][0], "down" if cut else "up")


class _Api:
    def __init__(self, db_url: str, workdir: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MERCATO_")}
        env.update(
            {
                "MERCATO_DATABASE_URL": db_url,
                "MERCATO_DATA_DIR": str(workdir),
                "MERCATO_AUTH_ARGON2_TIME_COST": "1",
                "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
                "MERCATO_RATELIMIT_ENABLED": "false",
                # Short freshness, so reads during the partition are past it and need the origin.
                "MERCATO_CACHE_FRESH_S": "2",
                "MERCATO_CACHE_LOCAL_FRESH_S": "2",
                "MERCATO_CACHE_STALE_WHILE_REVALIDATE_S": "0",
                # A checkout cut off mid-flight has an unknown outcome: its key answers 409 until the
                # claim's lock lapses (60 s by default); shortened so the lab sees the retry settle.
                # If the cut-off attempt did commit, the retry would make a second order: counted.
                "MERCATO_IDEMPOTENCY_LOCK_TIMEOUT_S": "4",
            }
        )
        self.base_url = f"http://{CLIENT_NS}:{port}"
        self.log = workdir / "api.log"
        argv = [IP, "netns", "exec", NS, sys.executable, "-m", "mercato.cli.main", "api"]
        argv += ["--host", CLIENT_NS, "--port", str(port), "--workers", "1"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603

    def wait_ready(self) -> None:
        def ready() -> bool:
            return httpx.get(f"{self.base_url}/startupz", timeout=1.0).status_code == 200

        if not wait_until(ready, timeout_s=90, interval_s=0.3):
            raise RuntimeError(f"the API did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


async def _customer(client: httpx.AsyncClient) -> str:
    email, password = f"hel-part-{uuid.uuid4().hex[:8]}@example.com", "partition-password-123"
    (await client.post("/v1/auth/register", json={"email": email, "password": password})).raise_for_status()
    login = await client.post("/v1/auth/login", json={"email": email, "password": password})
    login.raise_for_status()
    return str(login.json()["access_token"])


async def _drive(api: _Api, config: PartitionConfig, log: Any) -> PartitionReport:
    report = PartitionReport()
    async with httpx.AsyncClient(base_url=api.base_url, timeout=config.client_timeout_s) as client:
        token = await _customer(client)
        auth = {"Authorization": f"Bearer {token}"}
        items = (await client.get("/v1/products", params={"limit": 10})).json()["items"]
        product_ids = [p["id"] for p in items]
        sku = items[0]["sku"]
        for pid in product_ids:  # warm the catalog cache
            (await client.get(f"/v1/products/{pid}")).raise_for_status()
        (await client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=auth)).raise_for_status()
        checkout_key = f"hel-part-{uuid.uuid4().hex}"
        t0 = time.monotonic()
        phase = "partition"

        async def call(op: str, stance: str, send: Any) -> Sample:
            start = time.monotonic()
            try:
                response = await send()
            except httpx.TimeoutException:
                return Sample(op, stance, phase, start - t0, time.monotonic() - start, 0)
            stale = response.headers.get("mercato-staleness")
            return Sample(
                op,
                stance,
                phase,
                start - t0,
                time.monotonic() - start,
                response.status_code,
                "retry-after" in response.headers,
                None if stale is None else int(stale),
                response.headers.get("idempotent-replayed") == "true",
            )

        async def round_(i: int) -> list[Sample]:
            pid = product_ids[i % len(product_ids)]
            return list(
                await asyncio.gather(
                    call("product read", "AP", lambda: client.get(f"/v1/products/{pid}")),
                    call(
                        "cart change",
                        "CP",
                        lambda: client.put(
                            f"/v1/carts/me/items/{sku}", json={"quantity": 1 + i % 3}, headers=auth
                        ),
                    ),
                    call(
                        "checkout",
                        "CP",
                        lambda: client.post(
                            "/v1/checkout", headers={**auth, "Idempotency-Key": checkout_key}
                        ),
                    ),
                )
            )

        await asyncio.sleep(2.5)  # the warmed entries go past their freshness
        set_partition(True)
        report.cut_at = time.monotonic() - t0
        report.cut_wall = time.time()
        log("partition: the API's database link is down")
        i = 0
        while time.monotonic() - t0 - report.cut_at < config.partition_s:
            report.samples.extend(await round_(i))
            i += 1
            await asyncio.sleep(config.interval_s)
        set_partition(False)
        report.healed_at = time.monotonic() - t0
        phase = "healed"
        log("healed: the link is up again")
        while time.monotonic() - t0 - report.healed_at < config.heal_s:
            report.samples.extend(await round_(i))
            i += 1
            await asyncio.sleep(config.interval_s)
        orders = (await client.get("/v1/orders", headers=auth, params={"limit": 100})).json()["items"]
        report.orders_after = len(orders)
    healed = [s for s in report.samples if s.phase == "healed"]
    cp_ok = [s.t for s in healed if s.stance == "CP" and 200 <= s.status < 300]
    fresh = [s.t for s in healed if s.stance == "AP" and s.status == 200 and s.staleness_s is None]
    report.first_cp_success_after_heal_s = round(min(cp_ok) - report.healed_at, 2) if cp_ok else None
    report.first_fresh_read_after_heal_s = round(min(fresh) - report.healed_at, 2) if fresh else None
    report.checkout_keys_accepted = (
        1 if any(s.op == "checkout" and s.status == 202 for s in report.samples) else 0
    )
    return report


def run_partition(config: PartitionConfig, *, log: Any = print) -> PartitionReport:
    if os.geteuid() != 0:
        raise RuntimeError("the partition lab makes network namespaces: run it as root")
    with tempfile.TemporaryDirectory(prefix="hel-partition-") as tmp, network_namespace():
        work = Path(tmp)
        work.chmod(0o755)
        node = PostgresNode(work / "pg", settings={"listen_addresses": f"'127.0.0.1,{DB_HOST}'"})
        api: _Api | None = None
        try:
            node.init()
            node.allow_hosts(f"{DB_HOST.rsplit('.', 1)[0]}.0/30")
            node.start()
            node.create_database("mercato")
            migrate_and_seed(node.url("mercato"), work, products=10)
            api = _Api(f"postgresql+asyncpg://postgres@{DB_HOST}:{node.port}/mercato", work, config.api_port)
            api.wait_ready()
            log(f"API in namespace {NS} at {api.base_url}; PostgreSQL at {DB_HOST}:{node.port}")
            return asyncio.run(_drive(api, config, log))
        finally:
            if api is not None:
                api.stop()
                if config.out.is_dir():
                    (config.out / "api.log").write_bytes(api.log.read_bytes())
            node.destroy()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report_table(report: PartitionReport) -> Table:
    table = Table(title="CAP: the API cut off from its primary database")
    for column in ("phase", "operation", "stance", "requests", "answers", "p50 s", "max s", "stale header"):
        table.add_column(column)
    for phase in ("partition", "healed"):
        for op in ("cart change", "checkout", "product read"):
            rows = [s for s in report.samples if s.phase == phase and s.op == op]
            if not rows:
                continue
            statuses: dict[str, int] = {}
            for s in rows:
                key = "timeout" if s.status == 0 else str(s.status)
                statuses[key] = statuses.get(key, 0) + 1
            lat = [s.latency_s for s in rows]
            stale = [s.staleness_s for s in rows if s.staleness_s is not None]
            table.add_row(
                phase, op, rows[0].stance, str(len(rows)),
                ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items())),
                f"{_pct(lat, 0.5):.3f}", f"{max(lat):.3f}",
                f"{len(stale)} (max {max(stale)} s)" if stale else "0",
            )  # fmt: skip
    return table


def verdict(report: PartitionReport) -> list[str]:
    cp, ap = report.during("CP"), report.during("AP")
    word = "held" if report.held else "did not hold"
    later, at_cut = report.cp_after_detection(), report.cp_at_cut()
    slowest_later = max((s.latency_s for s in later), default=0.0)
    slowest_at_cut = max((s.latency_s for s in at_cut), default=0.0)
    return [
        f"claim {word}",
        f"CP sent after the partition was detectable (cut + {DETECT_BOUND_S:.1f} s): "
        f"{report.cp_fast_503}/{len(later)} answered 503 with Retry-After within {CP_BOUND_S:.0f} s "
        f"(slowest {slowest_later:.2f} s)",
        f"CP already in flight at the cut: {report.cp_at_cut_fast_503}/{len(at_cut)} answered 503 with "
        f"Retry-After within {CP_BOUND_S:.0f} s (slowest {slowest_at_cut:.2f} s: one silent probe, "
        "corroborated by the statement itself, ends it)",
        f"AP during the partition: slowest {max((s.latency_s for s in ap), default=0.0):.2f} s",
        f"all CP during the partition: {sum(1 for s in cp if s.status == 503)}/{len(cp)} 503",
        f"AP during the partition: {report.ap_served_stale}/{len(ap)} served 200 with Mercato-Staleness",
        f"after healing: first CP success {report.first_cp_success_after_heal_s} s, first fresh read "
        f"{report.first_fresh_read_after_heal_s} s; orders {report.orders_after} for 1 checkout key "
        f"retried throughout (accepted: {report.checkout_keys_accepted})",
    ]


def draw(report: PartitionReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    colours = {"product read": "tab:green", "cart change": "tab:orange", "checkout": "tab:red"}
    for op, colour in colours.items():
        rows = [s for s in report.samples if s.op == op]
        ax.scatter([s.t for s in rows], [s.latency_s for s in rows], s=14, color=colour, label=op)
        bad = [s for s in rows if s.status == 0 or s.status >= 500]
        ax.scatter(
            [s.t for s in bad], [s.latency_s for s in bad], s=40, facecolors="none", edgecolors="black"
        )
    ax.axvspan(report.cut_at, report.healed_at, color="grey", alpha=0.15, label="partition")
    ax.axhline(CP_BOUND_S, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("latency, s (circled: 5xx or no answer)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("CP answers 503 fast, AP serves stale with Mercato-Staleness, both converge on healing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def partition_command(
    partition_s: Annotated[
        float, typer.Option(min=2, max=120, help="How long the database link is down")
    ] = 8.0,
    heal_s: Annotated[float, typer.Option(min=2, max=120, help="How long to keep measuring after")] = 12.0,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Cut an API process (in its own network namespace) off from its primary database: CP
    operations answer 503 within 1 s, catalog reads are served stale with Mercato-Staleness, and
    after healing nothing is lost."""
    if update_docs:
        check_docs_target("partition")
    run = RunFolder.open("partition", out)
    config = PartitionConfig(partition_s=partition_s, heal_s=heal_s, out=run.path)
    report = run_partition(config, log=_console.log)
    draw(report, run.figure)
    table = report_table(report)
    _console.print(table)
    lines = verdict(report)
    for line in lines:
        _console.print(line)
    run.record(
        data={
            "config": {**asdict(config), "out": str(config.out)},
            "held": report.held,
            **{k: v for k, v in asdict(report).items() if k != "samples"},
            "samples": [asdict(s) for s in report.samples],
        },
        tables=[table],
        verdict=lines,
        update_docs=update_docs,
        console=_console,
    )
    if not report.held:
        raise typer.Exit(1)
