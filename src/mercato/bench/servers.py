"""Starting the servers under test and preparing the database they read.

Both servers are subprocesses on free loopback ports: Mercato as ``mercato api`` would run it, the
baseline through `mercato.bench.baseline`. The database is migrated and seeded with the demo
catalog by the project's own migration and seed code before Mercato starts.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from mercato.bench.client import ALLOWED_HOST
from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.config import AuthSettings, DatabaseSettings, Environment, SeedSettings, Settings
from mercato.demo.seed import seed_demo
from mercato.kit import ports
from mercato.kit.storage.migrations import upgrade

# Ports `free_port` picks from (None: any the kernel offers). A bench on a machine shared with other
# runs sets it (`mercato bench realtime --port-range`) so its servers stay inside the range it owns.
_port_range: tuple[int, int] | None = None


def set_port_range(low: int, high: int) -> None:
    """Pick every later `free_port` in [low, high] (inclusive)."""
    global _port_range
    if not 0 < low <= high < 65536:
        raise ValueError("a port range is 1 <= low <= high <= 65535")
    _port_range = (low, high)


def free_port() -> int:
    return ports.free_port(ALLOWED_HOST, within=_port_range)


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-Linux
        return 100


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its direct children (uvicorn workers); Linux only."""
    proc = Path("/proc")
    if not (proc / str(pid)).exists():
        return None
    pids = [pid]
    try:
        for task in (proc / str(pid) / "task").iterdir():
            children = (task / "children").read_text().split()
            pids.extend(int(c) for c in children)
    except OSError:
        pass
    total = 0
    for item in pids:
        stat = _stat(str(item))
        if stat is not None:
            fields = stat[1]
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _clock_ticks()


def _stat(pid: str) -> tuple[str, list[str]] | None:
    """A process's command name and the fields of /proc/<pid>/stat after it (field 3 onwards)."""
    try:
        head, _, tail = (Path("/proc") / pid / "stat").read_text().rpartition(")")
    except OSError:
        return None
    return (head.partition("(")[2], tail.split()) if head else None


def command_cpu_s(command: str) -> float:
    """CPU seconds of every process whose command name is `command` (e.g. ``postgres``: the server's
    postmaster and backends), with the children they have reaped, so a backend that exits between two
    readings still counts (its time moves to its parent's cutime/cstime); Linux only."""
    total = 0
    for entry in Path("/proc").iterdir():
        stat = _stat(entry.name) if entry.name.isdigit() else None
        if stat is not None and stat[0] == command:  # utime, stime, cutime, cstime (fields 14-17)
            total += sum(int(v) for v in stat[1][11:15])
    return total / _clock_ticks()


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process), from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / _clock_ticks()


def server_settings(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """`--setting MERCATO_NAME=VALUE` options as (name, value) pairs for a Mercato server's
    environment; ValueError for anything else (a typo must not silently measure the defaults)."""
    pairs = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("MERCATO_") or not name[len("MERCATO_") :]:
            raise ValueError(f"{item!r}: expected MERCATO_NAME=VALUE")
        pairs.append((name, value))
    return tuple(pairs)


async def settle(
    servers: list[ServerProcess], *, quiet_share: float = 0.1, window_s: float = 0.5, limit_s: float = 30.0
) -> float:
    """Wait until `servers` together use less than `quiet_share` of one core over a `window_s`
    window (or `limit_s` passed); returns the seconds waited. Work a run caused but that finished
    after it (consumers and projectors behind by the run's end) then counts in the run's CPU and
    statements instead of falling outside the measured window."""
    started = time.monotonic()
    before = sum(s.cpu_s() or 0.0 for s in servers)
    while time.monotonic() - started < limit_s:
        await asyncio.sleep(window_s)
        after = sum(s.cpu_s() or 0.0 for s in servers)
        if after - before < quiet_share * window_s:
            break
        before = after
    return time.monotonic() - started


@dataclass
class ServerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{ALLOWED_HOST}:{self.port}"

    def cpu_s(self) -> float | None:
        return process_tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_server(
    name: str,
    args: list[str],
    *,
    port: int,
    workdir: Path,
    env: dict[str, str],
    ready_path: str,
    timeout_s: float = 60.0,
) -> ServerProcess:
    """Start ``python args...`` and wait until ``GET ready_path`` answers 200."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            [sys.executable, *args], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(name=name, proc=proc, port=port, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{server.base_url}{ready_path}", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not become ready:\n{log_path.read_text(errors='replace')}")


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MERCATO_")}
    env.update(extra)
    return env


def start_mercato(
    *,
    database_url: str,
    workdir: Path,
    workers: int,
    name: str = "mercato",
    settings_env: dict[str, str] | None = None,
) -> ServerProcess:
    """``mercato api`` on a free port against ``database_url`` (settings otherwise default, or
    ``settings_env``'s ``MERCATO_*`` overrides)."""
    port = free_port()
    env = _clean_env(
        {"MERCATO_DATABASE_URL": database_url, "MERCATO_DATA_DIR": str(workdir), **(settings_env or {})}
    )
    args = ["-m", "mercato.cli.main", "api", "--host", ALLOWED_HOST, "--port", str(port)]
    args += ["--workers", str(workers)]
    return start_server(name, args, port=port, workdir=workdir, env=env, ready_path="/startupz")


def start_baseline(
    *, workdir: Path, workers: int, kind: str, database_url: str | None = None, name: str = "baseline"
) -> ServerProcess:
    """The bare baseline; `kind="asyncpg"` needs `database_url` (the database Mercato reads)."""
    from mercato.bench.baseline import BARE_PATH, BASELINE_DSN_ENV

    port = free_port()
    args = ["-m", "mercato.bench.baseline", "--port", str(port), "--workers", str(workers), "--kind", kind]
    extra = {} if database_url is None else {BASELINE_DSN_ENV: database_url.replace("+asyncpg", "", 1)}
    return start_server(name, args, port=port, workdir=workdir, env=_clean_env(extra), ready_path=BARE_PATH)


def start_simulators(workdir: Path) -> list[ServerProcess]:
    """The PSP and carrier simulators as processes of their own (their CPU is not the caller's),
    each ready once its `/healthz` answers."""
    env = _clean_env({"MERCATO_DATA_DIR": str(workdir)})
    started: list[ServerProcess] = []
    try:
        for kind in ("psp", "carrier"):
            port = free_port()
            args = [
                "-m",
                "mercato.cli.main",
                "provider",
                kind,
                "--port",
                str(port),
                "--data-dir",
                str(workdir),
            ]
            started.append(
                start_server(kind, args, port=port, workdir=workdir, env=env, ready_path="/healthz")
            )
    except Exception:
        for server in started:
            server.stop()
        raise
    return started


def bench_settings(database_url: str, workdir: Path, *, products: int) -> Settings:
    return Settings(
        env=Environment.DEV,
        data_dir=workdir,
        database=DatabaseSettings(url=database_url),
        # Cheap password hashing: seeding is set-up, not what is measured.
        auth=AuthSettings(argon2_time_cost=1, argon2_memory_kib=8192),
        seed=SeedSettings(products=products),
    )


def migrate_and_seed(database_url: str, workdir: Path, *, products: int) -> int:
    """Apply migrations and the demo seed (a no-op when already seeded); returns products created."""
    upgrade(SCRIPT_LOCATION, database_url)
    settings = bench_settings(database_url, workdir, products=products)

    async def _seed() -> int:
        container = build_container(settings)
        try:
            return (await seed_demo(container)).products
        finally:
            await container.close()

    return asyncio.run(_seed())


def _pg_admin_dsn(database_url: str) -> tuple[str, str]:
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql" or not url.database:
        raise ValueError("--create-database needs a postgresql URL naming a database")
    admin = url.set(drivername="postgresql", database="postgres")
    return admin.render_as_string(hide_password=False), url.database


async def _pg_execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def database(database_url: str | None, workdir: Path, *, create: bool) -> Iterator[str]:
    """The URL to benchmark against: a fresh SQLite file in ``workdir`` when none is given.

    With ``create`` (PostgreSQL only) the named database is created first and dropped afterwards.
    """
    if database_url is None:
        yield f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        return
    if not create:
        yield database_url
        return
    admin, name = _pg_admin_dsn(database_url)
    quoted = '"' + name.replace('"', '""') + '"'
    asyncio.run(_pg_execute(admin, f"CREATE DATABASE {quoted}"))
    try:
        yield database_url
    finally:
        asyncio.run(_pg_execute(admin, f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))


def product_paths(base_url: str, *, sample: int, seed: int = 7) -> list[str]:
    """``/v1/products/{id}`` paths for up to ``sample`` ids drawn from the seeded catalog."""
    ids: list[str] = []
    cursor: str | None = None
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        while True:
            params: dict[str, str | int] = {"limit": 100}
            if cursor:
                params["cursor"] = cursor
            response = client.get("/v1/products", params=params)
            response.raise_for_status()
            page = response.json()
            ids.extend(item["id"] for item in page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    if not ids:
        raise RuntimeError("the catalog is empty: nothing to benchmark")
    rng = random.Random(seed)
    chosen = rng.sample(ids, min(sample, len(ids)))
    return [f"/v1/products/{item}" for item in chosen]


def category_paths(base_url: str) -> list[str]:
    """``/v1/products?category=C`` for every category of the seeded catalog's first 100 products."""
    response = httpx.get(f"{base_url}/v1/products", params={"limit": 100}, timeout=10.0)
    response.raise_for_status()
    categories = sorted({item["category"] for item in response.json()["items"]})
    if not categories:
        raise RuntimeError("the catalog is empty: nothing to benchmark")
    return [f"/v1/products?category={category}" for category in categories]


def body_size(base_url: str, path: str) -> int:
    response = httpx.get(f"{base_url}{path}", timeout=10.0)
    response.raise_for_status()
    return len(response.content)
