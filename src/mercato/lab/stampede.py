"""``mercato lab stampede``: 1,000 requests for one hot key at its expiry; how many origin loads?

Hypothesis (guide §26 "protect against stampede"): plain cache-aside sends every request that
misses to the origin at once; single-flight cuts that to one load per process; XFetch (probabilistic
early recomputation) refreshes the key shortly *before* it expires, so with steady traffic about
one load happens in the whole fleet and nobody waits for it.

Set-up: `processes` caches (each its own memory tier and single-flight, as separate API processes
would have) share one Redis tier on the real Redis. The origin is a load of `load_ms` (an
`asyncio.sleep`, counted: the lab measures how many loads are sent and how many run at once, not
a database). The key is loaded, then `requests` arrive for it, spread over the processes, in one of
two patterns:

- ``burst``: all at once, just after the key expired (the worst case; no early refresh can help);
- ``steady``: evenly over the second around its expiry (the usual hot key).

Strategies: ``no guard`` (cache-aside only), ``single-flight``, ``single-flight + XFetch`` and, for
reference, ``stale-while-revalidate`` (serve the expired value while one refresh runs).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from redis.asyncio import BlockingConnectionPool, Redis
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.kit.cache import Cache, CacheTtls, MemoryTier, RedisTier

__all__ = ["StampedeResult", "run_experiment", "stampede_command"]

STRATEGIES = ("no guard", "single-flight", "single-flight + XFetch", "stale-while-revalidate")
PATTERNS = ("burst", "steady")


@dataclass(frozen=True, slots=True)
class StampedeResult:
    pattern: str
    strategy: str
    requests: int
    processes: int
    origin_loads: int
    peak_concurrent_loads: int
    stale_served: int
    p50_ms: float
    p99_ms: float
    max_ms: float


class Origin:
    def __init__(self, load_s: float) -> None:
        self.load_s = load_s
        self.loads = 0
        self.running = 0
        self.peak = 0
        self.version = 0

    async def load(self) -> bytes:
        self.loads += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.load_s)
            self.version += 1
            return f"v{self.version}".encode()
        finally:
            self.running -= 1


async def run_one(
    redis: Redis, *, pattern: str, strategy: str, requests: int, processes: int, load_s: float, fresh_s: float
) -> StampedeResult:
    prefix = f"lab:stampede:{uuid.uuid4().hex}"
    swr = strategy == "stale-while-revalidate"
    ttls = CacheTtls(
        fresh_s=fresh_s,
        stale_while_revalidate_s=fresh_s if swr else 0.0,
        stale_if_error_s=0.0,
        local_fresh_s=fresh_s,
    )
    caches = [
        Cache(
            "hot",
            local=MemoryTier(max_bytes=1 << 20),
            shared=RedisTier(redis, prefix=prefix),
            ttls=ttls,
            single_flight=strategy != "no guard",
            xfetch=strategy == "single-flight + XFetch",
        )
        for _ in range(processes)
    ]
    origin = Origin(load_s)
    # Open the pool's connections first: connecting 1,000 clients takes longer than a load, and
    # would spread the burst out (the first request would refill the key before the rest looked).
    await asyncio.gather(*(redis.ping() for _ in range(requests)))
    await caches[0].get("key", origin.load)
    # The first load's time is the entry's delta for XFetch; expiry is fresh_s after it was stored.
    expiry = time.monotonic() + fresh_s
    origin.loads = origin.peak = 0
    stale_before = 0
    latencies: list[float] = []
    served: list[bytes | None] = []

    async def request(index: int, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        started = time.monotonic()
        served.append(await caches[index % processes].get("key", origin.load))
        latencies.append(time.monotonic() - started)

    if pattern == "burst":
        times = [expiry + 0.01] * requests
    else:
        times = [expiry - 0.5 + i / requests for i in range(requests)]
    await asyncio.gather(*(request(i, at) for i, at in enumerate(times)))
    await asyncio.sleep(load_s * 2)  # background refreshes finish (and are counted)
    stale_served = sum(1 for value in served if value == b"v1") if swr else stale_before
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)
    ordered = sorted(latencies)
    return StampedeResult(
        pattern=pattern,
        strategy=strategy,
        requests=requests,
        processes=processes,
        origin_loads=origin.loads,
        peak_concurrent_loads=origin.peak,
        stale_served=stale_served,
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[max(0, int(0.99 * len(ordered)) - 1)] * 1000,
        max_ms=ordered[-1] * 1000,
    )


async def run_experiment(
    *, redis_url: str, requests: int, processes: int, load_ms: float, fresh_s: float
) -> list[StampedeResult]:
    # A connection per request: a smaller pool would queue the burst and hide the stampede.
    pool = BlockingConnectionPool.from_url(redis_url, max_connections=max(64, requests), timeout=30)
    redis = Redis(connection_pool=pool)
    try:
        return [
            await run_one(
                redis,
                pattern=pattern,
                strategy=strategy,
                requests=requests,
                processes=processes,
                load_s=load_ms / 1000,
                fresh_s=fresh_s,
            )
            for pattern in PATTERNS
            for strategy in STRATEGIES
        ]
    finally:
        await redis.aclose()


def table(results: list[StampedeResult]) -> Table:
    out = Table(title="A hot key at its expiry: origin loads by strategy")
    for name in ("pattern", "strategy", "requests", "processes", "origin loads", "peak concurrent loads",
                 "stale served", "p50 ms", "p99 ms", "max ms"):  # fmt: skip
        out.add_column(name, justify="right" if name not in ("pattern", "strategy") else "left")
    for r in results:
        out.add_row(
            r.pattern,
            r.strategy,
            str(r.requests),
            str(r.processes),
            str(r.origin_loads),
            str(r.peak_concurrent_loads),
            str(r.stale_served),
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.max_ms:.1f}",
        )
    return out


def plot(results: list[StampedeResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.2
    for i, strategy in enumerate(STRATEGIES):
        values = [
            next(r.origin_loads for r in results if r.pattern == p and r.strategy == strategy)
            for p in PATTERNS
        ]
        xs = [j + (i - 1.5) * width for j in range(len(PATTERNS))]
        bars = ax.bar(xs, [max(v, 0.8) for v in values], width, label=strategy)
        ax.bar_label(bars, labels=[str(v) for v in values], fontsize=8)
    ax.set_xticks(range(len(PATTERNS)), [f"{p} ({results[0].requests} requests)" for p in PATTERNS])
    ax.set_yscale("log")
    ax.set_ylabel("origin loads (log)")
    ax.set_title(f"Hot key at expiry, {results[0].processes} processes sharing Redis")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def verdict(results: list[StampedeResult]) -> list[str]:
    by = {(r.pattern, r.strategy): r for r in results}
    lines = []
    for pattern in PATTERNS:
        loads = {s: by[(pattern, s)].origin_loads for s in STRATEGIES}
        lines.append(f"{pattern}: " + ", ".join(f"{s} {n} loads" for s, n in loads.items()))
    steady = by[("steady", "single-flight + XFetch")]
    lines.append(
        f"steady traffic with XFetch: {steady.origin_loads} load(s) for {steady.processes} processes, "
        f"p99 {steady.p99_ms:.1f} ms (the refresh ran before expiry)"
    )
    return lines


def stampede_command(
    requests: Annotated[int, typer.Option(min=10, max=100_000, help="Requests for the hot key")] = 1000,
    processes: Annotated[int, typer.Option(min=1, max=64, help="API processes sharing Redis")] = 4,
    load_ms: Annotated[float, typer.Option(min=1, max=5000, help="Origin load time, ms")] = 100.0,
    fresh_s: Annotated[float, typer.Option(min=1, max=60, help="Seconds the key stays fresh")] = 2.0,
    redis_url: Annotated[str, typer.Option(help="The Redis of the shared tier")] = "redis://127.0.0.1:6379/0",
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """1,000 requests for a hot key at its expiry: origin loads with no guard, single-flight, XFetch."""
    if update_docs:
        check_docs_target("stampede")
    results = asyncio.run(
        run_experiment(
            redis_url=redis_url, requests=requests, processes=processes, load_ms=load_ms, fresh_s=fresh_s
        )
    )
    Console(width=180).print(table(results))
    run = RunFolder.open("stampede", out)
    plot(results, run.figure)
    run.record(
        data={"results": [asdict(r) for r in results]},
        tables=[table(results)],
        verdict=verdict(results),
        update_docs=update_docs,
        console=Console(stderr=True),
    )
