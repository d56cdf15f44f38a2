"""``mercato bench ratelimit``, part 2: token-bucket decisions per second on one Redis, from our asyncio
client (concurrent `hit` calls, and raw pipelined EVALSHA batches) and from ``redis-benchmark`` sending
the same EVALSHA (the backend's physical limit on this machine)."""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from redis.asyncio import Redis

from mercato.bench.ratelimit_server import KEYS, NEVER_LIMITS
from mercato.kit.ratelimit import PipelinedRedis, RedisLimiter
from mercato.kit.ratelimit.redis_backend import load_script_source

# --- decisions per second ------------------------------------------------------------------------------


@dataclass
class DecisionRates:
    """Token-bucket decisions per second on one Redis, by client."""

    client_loop: float  # RedisLimiter.hit on the pipelined connection from `concurrency` tasks (the gateway)
    client_loop_redis_py: float  # the same loop on a redis-py client (pool of `concurrency` connections)
    client_loop_cpu_us: float  # client CPU per decision, pipelined connection
    client_loop_redis_py_cpu_us: float  # client CPU per decision, redis-py
    client_pipelined: float  # raw EVALSHA in pipelines of `batch` (the Python client's ceiling)
    redis_benchmark: float | None  # redis-benchmark, same EVALSHA, `bench_clients` connections
    redis_benchmark_pipelined: float | None  # the same with -P `batch`
    concurrency: int
    batch: int
    bench_clients: int
    seconds: float
    script_sha: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def _client_loop(
    redis_url: str, prefix: str, *, seconds: float, concurrency: int, pipelined: bool = True
) -> tuple[float, float]:
    """Decisions/s and this process's CPU µs per decision (Redis runs in its own process)."""
    client: Redis | PipelinedRedis = (
        PipelinedRedis(redis_url, socket_timeout_s=1.0)
        if pipelined
        else Redis.from_url(redis_url, max_connections=concurrency)
    )
    limiter = RedisLimiter("token_bucket", client=client, key_prefix=prefix)
    count = 0
    try:
        await limiter.hit("warm", NEVER_LIMITS)  # loads the script once
        stop = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal count
            n = offset
            while time.perf_counter() < stop:
                await limiter.hit(f"k{n % KEYS}", NEVER_LIMITS)
                n += concurrency
                count += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        return count / elapsed, cpu / max(count, 1) * 1e6
    finally:
        await client.aclose()


def _script_args() -> list[str]:
    limit = NEVER_LIMITS
    return [str(limit.rate), repr(float(limit.period_s)), str(limit.capacity), "1", "1", "", ""]


async def _pipelined(redis_url: str, prefix: str, sha: str, *, seconds: float, batch: int) -> float:
    client = Redis.from_url(redis_url)
    args = _script_args()
    count = 0
    try:
        stop = time.perf_counter() + seconds
        started = time.perf_counter()
        n = 0
        while time.perf_counter() < stop:
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.evalsha(sha, 1, f"{prefix}token_bucket:p{n % KEYS}", *args)
                n += 1
            await pipe.execute()
            count += batch
        return count / (time.perf_counter() - started)
    finally:
        await client.aclose()


def _redis_benchmark(
    redis_url: str, prefix: str, sha: str, *, requests: int, clients: int, pipeline: int
) -> float:
    url = urlparse(redis_url)
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise FileNotFoundError("redis-benchmark is not on PATH (Debian: apt-get install redis-tools)")
    command = [binary, "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379)]
    if url.path and url.path.strip("/"):
        command += ["--dbnum", url.path.strip("/")]
    command += ["-n", str(requests), "-c", str(clients), "-P", str(pipeline), "-r", str(KEYS), "--csv"]
    command += ["EVALSHA", sha, "1", f"{prefix}token_bucket:b__rand_int__", *_script_args()]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout  # noqa: S603
    rows = list(csv.reader(io.StringIO(out)))
    return float(rows[-1][1])


async def cleanup_keys(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


def measure_decisions(
    redis_url: str,
    *,
    seconds: float = 5.0,
    concurrency: int = 32,
    batch: int = 16,
    bench_clients: int = 50,
    run_redis_benchmark: bool = True,
) -> DecisionRates:
    """Token-bucket decisions/s on Redis from our client and from redis-benchmark (keys cleaned up after)."""
    prefix = f"mercato:bench:rl:{uuid.uuid4().hex[:12]}:"
    source = load_script_source("token_bucket")

    async def load() -> str:
        client = Redis.from_url(redis_url)
        try:
            return str(await client.script_load(source))  # type: ignore[misc]
        finally:
            await client.aclose()

    try:
        sha = asyncio.run(load())
        loop_rate, loop_cpu = asyncio.run(
            _client_loop(redis_url, prefix, seconds=seconds, concurrency=concurrency)
        )
        loop_rate_redis_py, loop_cpu_redis_py = asyncio.run(
            _client_loop(redis_url, prefix, seconds=seconds, concurrency=concurrency, pipelined=False)
        )
        piped = asyncio.run(_pipelined(redis_url, prefix, sha, seconds=seconds, batch=batch))
        notes: list[str] = []
        plain = piped_bench = None
        if run_redis_benchmark:
            try:
                # About `seconds` worth of requests at the rate the pipelined client reached.
                n = max(20_000, int(piped * seconds))
                plain = _redis_benchmark(
                    redis_url, prefix, sha, requests=n, clients=bench_clients, pipeline=1
                )
                piped_bench = _redis_benchmark(
                    redis_url, prefix, sha, requests=n * 2, clients=bench_clients, pipeline=batch
                )
            except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
                notes.append(f"redis-benchmark not run: {exc}")
    finally:
        asyncio.run(cleanup_keys(redis_url, prefix))
    return DecisionRates(
        client_loop=loop_rate,
        client_loop_redis_py=loop_rate_redis_py,
        client_loop_cpu_us=loop_cpu,
        client_loop_redis_py_cpu_us=loop_cpu_redis_py,
        client_pipelined=piped,
        redis_benchmark=plain,
        redis_benchmark_pipelined=piped_bench,
        concurrency=concurrency,
        batch=batch,
        bench_clients=bench_clients,
        seconds=seconds,
        script_sha=sha,
        notes=notes,
    )
