"""``mercato lab ratelimit``: the five algorithms under the same bursty traffic.

Hypothesis (guide §11, ADR 0010): under one limit of 100 requests per second,
- the fixed window admits up to 2x the limit within one second that straddles a window edge;
- the sliding log never admits more than the limit in any one-second span; the sliding window counter
  stays close to it (it assumes the previous window's requests were spread evenly);
- the token bucket and the leaky bucket (GCRA meter) admit the burst they are configured for and then
  exactly the sustained rate;
- the sliding log pays for its exactness with memory per key proportional to the rate; the others keep
  one or two numbers per key.

Run: one deterministic traffic trace (steady load, Poisson arrivals, bursts, and one burst placed across a
fixed-window edge) is replayed against each algorithm on the memory backend with a manual clock, so the
time series are exact and repeatable. Memory per key is measured on both backends (tracemalloc for the
in-process table; `MEMORY USAGE` on Redis), and decision cost (µs per decision: in-process call, and one
Redis round trip with the EVALSHA) on both backends. Output: a table and a figure in the run folder
(``--update-docs`` refreshes ``docs/lab/ratelimit.png``).
"""

from __future__ import annotations

import asyncio
import random
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.kit.clock import ManualClock
from mercato.kit.ratelimit import ALGORITHM_NAMES, Limit, RateLimiter, RedisLimiter, build_limiter

__all__ = ["AlgorithmResult", "Trace", "bursty_trace", "ratelimit_command", "run_experiment"]

LIMIT = Limit(rate=100, period_s=1.0, burst=100)
BIN_S = 0.1
# The fixed-window edge the trace aims one burst at.
EDGE_S = 12.0


@dataclass(frozen=True)
class Trace:
    arrivals: tuple[float, ...]
    duration_s: float
    edge_s: float


def bursty_trace(*, duration_s: float = 20.0, seed: int = 42) -> Trace:
    """Poisson arrivals at 60/s, bursts of 400/s for 1 s at t = 3 and 16, and the edge burst.

    The edge burst: silence for the second before `EDGE_S - 0.1`, then 300 requests in the 0.1 s before
    the edge and 300 in the 0.1 s after it, so a fixed window sees a fresh quota on each side.
    """
    rng = random.Random(seed)
    arrivals: list[float] = []

    def poisson(start_s: float, end_s: float, rate: float) -> None:
        t = start_s
        while True:
            t += rng.expovariate(rate)
            if t >= end_s:
                return
            arrivals.append(t)

    quiet_start = EDGE_S - 1.1
    poisson(0.0, quiet_start, 60.0)
    poisson(3.0, 4.0, 400.0)
    for k in range(300):
        arrivals.append(EDGE_S - 0.1 + k * (0.1 / 300))
        arrivals.append(EDGE_S + k * (0.1 / 300))
    poisson(EDGE_S + 0.1, duration_s, 60.0)
    poisson(16.0, 17.0, 400.0)
    return Trace(tuple(sorted(arrivals)), duration_s, EDGE_S)


@dataclass
class AlgorithmResult:
    algorithm: str
    admitted: list[float]  # admission times
    max_in_any_period: int = 0  # most admissions in any `period_s`-long span
    max_span_start_s: float = 0.0
    memory_bytes_per_key: float = 0.0
    redis_bytes_per_key: float | None = None
    memory_decision_us: float = 0.0
    redis_decision_us: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def burst_ratio(self) -> float:
        return self.max_in_any_period / LIMIT.rate


def _max_in_window(times: list[float], width_s: float) -> tuple[int, float]:
    best, start, j = 0, 0.0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width_s:
            j += 1
        if i - j + 1 > best:
            best, start = i - j + 1, times[j]
    return best, start


async def _replay(algorithm: str, trace: Trace) -> list[float]:
    clock = ManualClock()
    limiter = build_limiter(algorithm, "memory", clock=clock)
    admitted = []
    for t in trace.arrivals:
        clock.advance(t - clock.monotonic())
        if (await limiter.hit("client", LIMIT)).allowed:
            admitted.append(t)
    return admitted


async def _memory_bytes_per_key(algorithm: str, keys: int = 1000) -> float:
    """Bytes per key of the in-process table with every key at its steady state under full load."""
    clock = ManualClock()
    limiter = build_limiter(algorithm, "memory", clock=clock, max_keys=keys * 2)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for k in range(keys):
        for _ in range(LIMIT.rate):  # the sliding log holds one timestamp per admitted request
            await limiter.hit(f"key-{k:06d}", LIMIT)
        clock.advance(0.0001)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return grown / keys


async def _memory_decision_us(algorithm: str, n: int = 20_000) -> float:
    clock = ManualClock()
    limiter = build_limiter(algorithm, "memory", clock=clock)
    keys = [f"k{i % 1000}" for i in range(n)]
    started = time.perf_counter()
    for key in keys:
        clock.advance(0.00001)
        await limiter.hit(key, LIMIT)
    return (time.perf_counter() - started) / n * 1e6


async def _redis_measures(algorithm: str, redis_url: str, n: int = 2000) -> tuple[float, float]:
    """(µs per decision, one round trip each; bytes per key under full load) on the real Redis."""
    prefix = f"mercato:lab:rl:{uuid.uuid4().hex[:12]}:"
    client = Redis.from_url(redis_url)
    limiter: RateLimiter = RedisLimiter(algorithm, client=client, key_prefix=prefix)
    try:
        await limiter.hit("warm", LIMIT)
        started = time.perf_counter()
        for i in range(n):
            await limiter.hit(f"k{i % 100}", LIMIT)
        decision_us = (time.perf_counter() - started) / n * 1e6
        for _ in range(LIMIT.rate):
            await limiter.hit("full", LIMIT)
        usage = await client.memory_usage(f"{prefix}{algorithm}:full")
        return decision_us, float(usage or 0)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _run(trace: Trace, redis_url: str | None) -> list[AlgorithmResult]:
    results = []
    await _memory_decision_us("token_bucket", n=5000)  # warm-up: the first timed algorithm paid for it
    for algorithm in ALGORITHM_NAMES:
        admitted = await _replay(algorithm, trace)
        result = AlgorithmResult(algorithm, admitted)
        result.max_in_any_period, result.max_span_start_s = _max_in_window(admitted, LIMIT.period_s)
        result.memory_bytes_per_key = await _memory_bytes_per_key(algorithm)
        result.memory_decision_us = await _memory_decision_us(algorithm)
        if redis_url is not None:
            try:
                result.redis_decision_us, result.redis_bytes_per_key = await _redis_measures(
                    algorithm, redis_url
                )
            except OSError as exc:
                result.notes.append(f"redis not measured: {exc}")
        results.append(result)
    return results


def run_experiment(*, redis_url: str | None, seed: int = 42) -> tuple[Trace, list[AlgorithmResult]]:
    trace = bursty_trace(seed=seed)
    return trace, asyncio.run(_run(trace, redis_url))


def _rate_series(
    times: list[float] | tuple[float, ...], duration_s: float
) -> tuple[list[float], list[float]]:
    bins = int(duration_s / BIN_S)
    counts = [0] * bins
    for t in times:
        index = int(t / BIN_S)
        if index < bins:
            counts[index] += 1
    return [i * BIN_S for i in range(bins)], [c / BIN_S for c in counts]


def plot(trace: Trace, results: list[AlgorithmResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0][0]
    xs, offered = _rate_series(trace.arrivals, trace.duration_s)
    ax.fill_between(xs, offered, step="post", color="0.85", label="offered")
    for result in results:
        _, ys = _rate_series(result.admitted, trace.duration_s)
        ax.step(xs, ys, where="post", label=result.algorithm, linewidth=1.2)
    ax.axhline(LIMIT.rate, color="black", linestyle="--", linewidth=0.8)
    ax.axvspan(trace.edge_s - 0.1, trace.edge_s + 0.1, color="red", alpha=0.15, label="window-edge burst")
    ax.set(title=f"Admitted rate ({BIN_S:g} s bins), limit {LIMIT}", xlabel="time (s)", ylabel="requests/s")
    peak = max(max(_rate_series(r.admitted, trace.duration_s)[1]) for r in results)
    ax.set_ylim(0, peak * 1.25)  # the offered edge burst (3 000/s) is clipped: the admitted rates matter
    ax.legend(fontsize=8, ncol=2)

    ax = axes[0][1]
    names = [r.algorithm for r in results]
    counts = [r.max_in_any_period for r in results]
    # Red: the fixed window's 2x comes from a window edge, not from a configured burst (the buckets'
    # ~2x is their burst of 100 plus one second of refill, by design).
    colours = ["tab:red" if r.algorithm == "fixed_window" else "tab:blue" for r in results]
    bars = ax.bar(names, counts, color=colours)
    ax.bar_label(bars, labels=[f"{r.max_in_any_period} ({r.burst_ratio:.2f}x)" for r in results], fontsize=8)
    ax.axhline(LIMIT.rate, color="black", linestyle="--", linewidth=0.8, label="limit")
    ax.axhline(2 * LIMIT.rate, color="red", linestyle=":", linewidth=0.8, label="2x limit")
    ax.set(title=f"Most admitted in any {LIMIT.period_s:g} s span", ylabel="requests")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)

    width = 0.38
    positions = list(range(len(results)))
    ax = axes[1][0]
    ax.bar(
        [p - width / 2 for p in positions], [r.memory_bytes_per_key for r in results], width, label="memory"
    )
    ax.bar(
        [p + width / 2 for p in positions],
        [r.redis_bytes_per_key or 0 for r in results],
        width,
        label="Redis",
    )
    ax.set_xticks(positions, names, fontsize=8)
    ax.set_yscale("log")
    ax.set(title=f"Bytes per key at full load ({LIMIT.rate} in the window)", ylabel="bytes (log)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    ax.bar([p - width / 2 for p in positions], [r.memory_decision_us for r in results], width, label="memory")
    ax.bar(
        [p + width / 2 for p in positions],
        [r.redis_decision_us or 0 for r in results],
        width,
        label="Redis (round trip)",
    )
    ax.set_xticks(positions, names, fontsize=8)
    ax.set_yscale("log")
    ax.set(title="Decision cost (µs per decision, sequential)", ylabel="µs (log)")
    ax.legend(fontsize=8)

    fig.suptitle("Five rate-limit algorithms under the same bursty traffic (mercato lab ratelimit)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(trace: Trace, results: list[AlgorithmResult]) -> Table:
    out = Table(title=f"{len(trace.arrivals)} requests over {trace.duration_s:g} s, limit {LIMIT}")
    for column in (
        "algorithm",
        "admitted",
        "max in any 1 s",
        "x limit",
        "bytes/key mem",
        "bytes/key Redis",
        "µs/decision mem",
        "µs/decision Redis",
    ):
        out.add_column(column, justify="left" if column == "algorithm" else "right")
    for r in results:
        out.add_row(
            r.algorithm,
            str(len(r.admitted)),
            f"{r.max_in_any_period} (from t={r.max_span_start_s:.2f})",
            f"{r.burst_ratio:.2f}",
            f"{r.memory_bytes_per_key:,.0f}",
            "—" if r.redis_bytes_per_key is None else f"{r.redis_bytes_per_key:,.0f}",
            f"{r.memory_decision_us:.1f}",
            "—" if r.redis_decision_us is None else f"{r.redis_decision_us:.0f}",
        )
    return out


def ratelimit_command(
    redis_url: Annotated[
        str, typer.Option(help="Redis for the Redis-side measures")
    ] = "redis://127.0.0.1:6379/0",
    no_redis: Annotated[bool, typer.Option("--no-redis", help="Memory backend only")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the traffic trace")] = 42,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Five algorithms, one bursty trace: admitted rate, window-edge bursts, memory per key, decision cost."""
    if update_docs:
        check_docs_target("ratelimit")
    trace, results = run_experiment(redis_url=None if no_redis else redis_url, seed=seed)
    console = Console(width=160)
    console.print(table(trace, results))
    notes = [f"{result.algorithm}: {note}" for result in results for note in result.notes]
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    run = RunFolder.open("ratelimit", out)
    plot(trace, results, run.figure)
    fixed = next(r for r in results if r.algorithm == "fixed_window")
    log = next(r for r in results if r.algorithm == "sliding_log")
    verdict = (
        f"fixed window admitted {fixed.max_in_any_period} in one second across the edge at "
        f"t={trace.edge_s:g} s ({fixed.burst_ratio:.2f}x the limit); the sliding log at most "
        f"{log.max_in_any_period}."
    )
    console.print(verdict)
    run.record(
        data={"seed": seed, "limit": str(LIMIT), "algorithms": summary(results)},
        tables=[table(trace, results)],
        verdict=[verdict, *notes],
        update_docs=update_docs,
        console=Console(stderr=True),
    )


def summary(results: list[AlgorithmResult]) -> dict[str, Any]:
    """The figures as plain data (for docs and tests)."""
    return {
        r.algorithm: {
            "admitted": len(r.admitted),
            "max_in_any_period": r.max_in_any_period,
            "memory_bytes_per_key": round(r.memory_bytes_per_key),
            "redis_bytes_per_key": r.redis_bytes_per_key,
            "memory_decision_us": round(r.memory_decision_us, 2),
            "redis_decision_us": None if r.redis_decision_us is None else round(r.redis_decision_us, 1),
        }
        for r in results
    }
