"""`mercato lab balancing`: does a least-loaded choice keep the tail near the healthy instances' when
one instance is slow, where round robin does not? (guide §30)

Two setups, each with one slow member, each driven by a closed loop of `concurrency` clients for
`duration_s` per algorithm:

- **HAProxy** in front of 4 real `mercato api` processes; `api3` is slow by its fault switch
  (`MERCATO_HTTP_FAULT_DELAY_MS`). Algorithms: `roundrobin`, `leastconn`, `random(2)` (HAProxy's
  power of two choices). HAProxy names the server in `X-Served-By`, so each request's instance is
  known. Request: `GET /v1/products?limit=5`.
- **Client side** (`kit/balancing`) over 3 real PSP simulator processes; `psp2` is slow by its fault
  switch (`PUT /admin/faults`, constant latency). Policies: `round_robin`, `least_outstanding`,
  `p2c`. Request: `GET /v1/ledger?limit=1`.

Per algorithm: p50 / p99 of all requests, p99 of those the healthy instances served (the reference),
and each instance's share. The claim holds when both least-loaded choices keep p99 within
`NEAR_FACTOR` × the healthy reference of the same run while round robin's p99 is at least the
slow delay.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import httpx

from mercato.cluster.fleet import ApiFleet
from mercato.cluster.haproxy import BALANCE_ALGORITHMS, HAProxySettings
from mercato.cluster.processes import alive, read_pid, spawn, stop, wait_until
from mercato.kit.balancing import Balancer, Outcome, Policy
from mercato.kit.ports import free_port

__all__ = ["NEAR_FACTOR", "AlgorithmResult", "run_client_side", "run_haproxy", "verdict"]

NEAR_FACTOR = 2.0
SERVED_BY = "X-Served-By"


@dataclass
class AlgorithmResult:
    side: str  # "haproxy" | "client"
    algorithm: str
    slow: str
    slow_ms: float
    requests: int = 0
    errors: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    healthy_p99_ms: float = 0.0
    share: dict[str, float] = field(default_factory=dict)

    @property
    def slow_share(self) -> float:
        return self.share.get(self.slow, 0.0)


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def summarise(result: AlgorithmResult, samples: list[tuple[str, float]], errors: int) -> AlgorithmResult:
    latencies = sorted(ms for _, ms in samples)
    healthy = sorted(ms for name, ms in samples if name != result.slow)
    counts: dict[str, int] = {}
    for name, _ in samples:
        counts[name] = counts.get(name, 0) + 1
    total = max(len(samples), 1)
    return replace(
        result,
        requests=len(samples),
        errors=errors,
        p50_ms=percentile(latencies, 50) if latencies else 0.0,
        p90_ms=percentile(latencies, 90) if latencies else 0.0,
        p99_ms=percentile(latencies, 99) if latencies else 0.0,
        healthy_p99_ms=percentile(healthy, 99) if healthy else 0.0,
        share={name: counts[name] / total for name in sorted(counts)},
    )


async def closed_loop(
    call: Callable[[aiohttp.ClientSession], Awaitable[str | None]], *, concurrency: int, duration_s: float
) -> tuple[list[tuple[str, float]], int]:
    """`concurrency` workers calling back to back for `duration_s`: (instance, ms) per success."""
    samples: list[tuple[str, float]] = []
    errors = 0
    deadline = time.monotonic() + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    served_by = await call(session)
                except (aiohttp.ClientError, TimeoutError):
                    served_by = None
                if served_by is None:
                    errors += 1
                    continue
                samples.append((served_by, (time.perf_counter() - started) * 1000))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, errors


# -- HAProxy in front of 4 API processes -------------------------------------------------------------


def _api_env(work: Path) -> dict[str, str]:
    from mercato.bootstrap import SCRIPT_LOCATION
    from mercato.kit.storage.migrations import upgrade

    work.mkdir(parents=True, exist_ok=True)
    url = f"sqlite+aiosqlite:///{work / 'shop.db'}"
    upgrade(SCRIPT_LOCATION, url)
    return {
        "MERCATO_DATABASE_URL": url,
        "MERCATO_RATELIMIT_ENABLED": "false",
        "MERCATO_BACKPRESSURE_ENABLED": "false",
        "MERCATO_TELEMETRY_LOG_LEVEL": "warning",
    }


def run_haproxy(
    work: Path,
    *,
    slow_ms: float,
    concurrency: int,
    duration_s: float,
    instances: int = 4,
    log: Callable[[str], None] = print,
) -> list[AlgorithmResult]:
    slow = f"api{instances - 1}"
    settings = HAProxySettings(
        balance="roundrobin",
        slowstart_s=0,
        extra_backend_lines=(f"http-response set-header {SERVED_BY} %[srv_name]",),
    )
    fleet = ApiFleet(
        work / "fleet",
        instances=instances,
        env=_api_env(work),
        instance_env={slow: {"MERCATO_HTTP_FAULT_DELAY_MS": str(slow_ms)}},
        settings=settings,
    )
    log(f"starting {instances} mercato api processes behind HAProxy ({slow} delayed {slow_ms:.0f} ms)")
    fleet.start()
    results: list[AlgorithmResult] = []
    try:
        for algorithm in BALANCE_ALGORITHMS:
            fleet.haproxy.settings = replace(settings, balance=algorithm)
            fleet.haproxy.reload()
            fleet.haproxy.wait_up(instances, timeout_s=30)
            url = f"{fleet.url}/v1/products?limit=5"

            async def call(session: aiohttp.ClientSession, url: str = url) -> str | None:
                async with session.get(url) as reply:
                    await reply.read()
                    return reply.headers.get(SERVED_BY) if reply.status == 200 else None

            asyncio.run(closed_loop(call, concurrency=concurrency, duration_s=1.0))  # warm up
            samples, errors = asyncio.run(closed_loop(call, concurrency=concurrency, duration_s=duration_s))
            result = summarise(AlgorithmResult("haproxy", algorithm, slow, slow_ms), samples, errors)
            log(f"  haproxy {algorithm}: {result.requests} requests, p99 {result.p99_ms:.1f} ms")
            results.append(result)
    finally:
        fleet.stop()
    return results


# -- the client-side balancer over 3 PSP simulators ----------------------------------------------


def _start_psp(work: Path, name: str) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "mercato.cli.main", "provider", "psp", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    spawn(work, name, [*argv, "--data-dir", str(work / name)], env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not alive(read_pid(work, name)):
            raise RuntimeError(f"{name} exited; see {work}/{name}.log")
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200

    if not wait_until(up, timeout_s=60, interval_s=0.3):
        raise RuntimeError(f"{name} did not start; see {work}/{name}.log")
    return url


def run_client_side(
    work: Path,
    *,
    slow_ms: float,
    concurrency: int,
    duration_s: float,
    log: Callable[[str], None] = print,
) -> list[AlgorithmResult]:
    names = ["psp0", "psp1", "psp2"]
    slow = names[-1]
    log(f"starting 3 PSP simulators ({slow} delayed {slow_ms:.0f} ms)")
    (work / "psps").mkdir(parents=True, exist_ok=True)
    results: list[AlgorithmResult] = []
    try:
        urls = {name: _start_psp(work / "psps", name) for name in names}
        delay = {"latency_p50_ms": slow_ms, "latency_p99_ms": slow_ms}
        delay |= {"read_latency_p50_ms": slow_ms, "read_latency_p99_ms": slow_ms}
        httpx.put(f"{urls[slow]}/admin/faults", json=delay, timeout=5).raise_for_status()
        by_url = {url: name for name, url in urls.items()}
        for policy in Policy:
            balancer = Balancer(list(urls.values()), policy=policy)

            async def call(session: aiohttp.ClientSession, balancer: Balancer = balancer) -> str | None:
                lease = balancer.acquire()
                try:
                    async with session.get(f"{lease.endpoint}/v1/ledger", params={"limit": "1"}) as reply:
                        await reply.read()
                        status = reply.status
                except BaseException:
                    lease.release(Outcome.LOCAL_FAILURE)
                    raise
                lease.release(Outcome.SERVER_ERROR if status >= 500 else Outcome.SUCCESS)
                return by_url[lease.endpoint] if status == 200 else None

            asyncio.run(closed_loop(call, concurrency=concurrency, duration_s=1.0))
            samples, errors = asyncio.run(closed_loop(call, concurrency=concurrency, duration_s=duration_s))
            result = summarise(AlgorithmResult("client", policy.value, slow, slow_ms), samples, errors)
            log(f"  client {policy.value}: {result.requests} requests, p99 {result.p99_ms:.1f} ms")
            results.append(result)
    finally:
        for name in names:
            stop(work / "psps", name, timeout_s=10)
    return results


def verdict(results: list[AlgorithmResult], *, load_average: str) -> list[str]:
    lines = []
    for side, rr_name in (("haproxy", "roundrobin"), ("client", "round_robin")):
        rows = [r for r in results if r.side == side]
        if not rows:
            continue
        rr = next(r for r in rows if r.algorithm == rr_name)
        least = [r for r in rows if r.algorithm != rr_name]
        # "Near the healthy instances'": within NEAR_FACTOR of the p99 the healthy instances gave in
        # the same run (a loaded machine moves both together).
        near = all(r.p99_ms <= NEAR_FACTOR * r.healthy_p99_ms for r in least)
        rr_slow = rr.p99_ms >= rr.slow_ms
        held = near and rr_slow

        def mark(r: AlgorithmResult, rr: AlgorithmResult = rr) -> str:
            if r is rr:
                return ""
            return ", near" if r.p99_ms <= NEAR_FACTOR * r.healthy_p99_ms else ", not near"

        figures = "; ".join(
            f"{r.algorithm} p99 {r.p99_ms:.1f} ms (healthy {r.healthy_p99_ms:.1f}, slow share "
            f"{r.slow_share:.1%}{mark(r)})"
            for r in rows
        )
        lines.append(
            f"{side}: claim {'held' if held else 'did not hold'} — least-loaded p99 within "
            f"{NEAR_FACTOR:g}× the healthy instances': {'yes' if near else 'no'}; round robin's p99 ≥ the "
            f"{rr.slow_ms:.0f} ms delay: {'yes' if rr_slow else 'no'}. {figures}"
        )
    lines.append(
        "why: p99 is the slowest 1 %; it stays on the healthy instances only while the slow one gets "
        "under 1 % of the requests (its share is in the table)"
    )
    lines.append(f"load average during the run: {load_average}")
    return lines


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"
