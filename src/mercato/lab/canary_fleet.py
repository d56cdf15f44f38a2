"""A release fleet on one machine: `mercato api` processes in groups behind a real HAProxy.

Used by `mercato lab canary` and by the release tests. One SQLite database (migrated, a few products,
and the runtime configuration's flag `catalog.search_v2` targeted at the `canary` track, so the canary
group really runs the new search); each process is `mercato api` with its own release track and
version (and, for a bad build, `MERCATO_RELEASE_INJECT_ERROR_RATIO`); HAProxy (cluster/haproxy.py)
balances them by weight and names the server in `X-Served-By`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.cluster.haproxy import Backend, HAProxy, HAProxySettings
from mercato.cluster.processes import spawn, stop, wait_until
from mercato.cluster.release import Deployment, Member
from mercato.config import DatabaseSettings, Settings
from mercato.kit.ports import free_port
from mercato.kit.storage.migrations import upgrade
from mercato.shop.catalog.model import NewProduct

__all__ = ["FleetMember", "LoadGenerator", "ReleaseFleet", "Sample"]

SEARCH_FLAG_DOC = {
    "flags": {
        "catalog.search_v2": {
            "description": "word search (the release under test), on for the canary track",
            "rules": [{"variant": "on", "tracks": ["canary"]}],
        }
    }
}
QUERIES = ("shoe", "red shoe", "shoe red", "blue", "lamp desk", "book")


@dataclass(frozen=True)
class FleetMember:
    name: str
    group: str
    track: str
    version: str
    error_ratio: float = 0.0


@dataclass
class ReleaseFleet:
    folder: Path
    members: Sequence[FleetMember]
    ports: dict[str, int] = field(default_factory=dict)
    haproxy: HAProxy | None = None

    @property
    def url(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.url

    def deployment(self, groups: dict[str, Sequence[str]] | None = None) -> Deployment:
        """The deployment over these processes; `groups`: group -> member names (default: by group)."""
        assert self.haproxy is not None
        by: dict[str, list[str]] = {}
        for m in self.members:
            by.setdefault(m.group, []).append(m.name)
        chosen: dict[str, Sequence[str]] = dict(by) if groups is None else groups
        deployment = Deployment(
            runtime_port=self.haproxy.runtime_port,
            groups={
                g: [Member(n, f"http://127.0.0.1:{self.ports[n]}") for n in names]
                for g, names in chosen.items()
            },
            folder=self.folder / "release",
        )
        deployment.save()
        return deployment

    def start(self, *, timeout_s: float = 120.0) -> ReleaseFleet:
        self.folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite+aiosqlite:///{self.folder / 'shop.db'}"
        upgrade(SCRIPT_LOCATION, url)
        asyncio.run(_prepare(url))
        for member in self.members:
            self.ports[member.name] = port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")} | {
                "MERCATO_DATABASE_URL": url,
                "MERCATO_DATA_DIR": str(self.folder / member.name),
                "MERCATO_RELEASE_TRACK": member.track,
                "MERCATO_RELEASE_VERSION": member.version,
                "MERCATO_RELEASE_INJECT_ERROR_RATIO": str(member.error_ratio),
                "MERCATO_RELEASE_CONFIG_POLL_S": "0.5",
                "MERCATO_RATELIMIT_ENABLED": "false",  # every request comes from HAProxy's address
                "MERCATO_TELEMETRY_LOG_LEVEL": "warning",
            }
            argv = [
                sys.executable,
                "-m",
                "mercato.cli.main",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            spawn(self.folder, member.name, argv, env=env)
        for member in self.members:
            target = f"http://127.0.0.1:{self.ports[member.name]}/startupz"
            if not wait_until(partial(_ok, target), timeout_s=timeout_s, interval_s=0.3):
                self.stop()
                log = (self.folder / f"{member.name}.log").read_text()[-2000:]
                raise RuntimeError(f"{member.name} did not start:\n{log}")
        backends = [
            Backend(
                m.name, "127.0.0.1", self.ports[m.name], weight=100 if m.group in ("stable", "blue") else 0
            )
            for m in self.members
        ]
        settings = HAProxySettings(
            check_interval_ms=1000,
            slowstart_s=0,
            extra_backend_lines=("http-response set-header X-Served-By %[srv_name]",),
        )
        self.haproxy = HAProxy(self.folder / "haproxy", backends, settings).start(wait_healthy=len(backends))
        return self

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for member in self.members:
            stop(self.folder, member.name, timeout_s=15.0)

    def __enter__(self) -> ReleaseFleet:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def _prepare(url: str) -> None:
    container = build_container(Settings(database=DatabaseSettings(url=url)))
    try:
        names = ["Red running shoe", "Blue desk lamp", "Shoe rack, red", "Blue book", "Desk lamp"]
        for i in range(40):
            name = f"{names[i % len(names)]} {i}"
            sku = f"HSP-{i:03d}"
            await container.catalog.create(
                NewProduct(sku=sku, name=name, price_minor=1000 + i, currency="EUR", category="books")
            )
        assert container.runtime is not None
        await container.runtime.store.put(SEARCH_FLAG_DOC, author="lab canary", comment="search v2 on canary")
    finally:
        await container.close()


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic
    status: int  # 0: no answer
    server: str
    latency_s: float


class LoadGenerator:
    """`rate` GET /v1/products?q=... per second through HAProxy, paced over `workers` threads."""

    def __init__(self, url: str, *, rate: float, workers: int = 4) -> None:
        self.url = url
        self.rate = rate
        self.workers = workers
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _run(self, index: int) -> None:
        period = self.workers / self.rate
        next_at = time.monotonic() + index * period / self.workers
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            n = index
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += period
                start = time.monotonic()
                try:
                    r = client.get("/v1/products", params={"q": QUERIES[n % len(QUERIES)], "limit": 5})
                    sample = Sample(
                        start, r.status_code, r.headers.get("x-served-by", ""), time.monotonic() - start
                    )
                except httpx.HTTPError:
                    sample = Sample(start, 0, "", time.monotonic() - start)
                n += self.workers
                with self._lock:
                    self.samples.append(sample)

    def __enter__(self) -> LoadGenerator:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
