"""Four real `mercato api` processes share one Redis and therefore one limit.

1.5x the quota is sent by concurrent clients spread round-robin over the four processes. The global quota
(a token bucket of 200 refilling one token an hour, so the count does not depend on how fast a loaded
machine serves) must admit 200 within 2 % in total, and every process must have admitted some: the
quota is shared, not per process (per-process limits would admit up to 4 x 200).
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.kit.storage.migrations import upgrade
from tests.e2e.conftest import start_mercato

pytestmark = pytest.mark.e2e

PROCESSES = 4
QUOTA = 200

POLICIES = f"""
[[rules]]
name = "global-quota"
dimensions = ["tenant"]
match = {{ path_prefix = "/v1/products" }}
limit = {{ rate = 1, period_s = 3600, burst = {QUOTA} }}
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    workdir = tmp_path_factory.mktemp("rl-mp")
    url = f"sqlite+aiosqlite:///{workdir}/shop.db"
    upgrade(SCRIPT_LOCATION, url)
    policy = workdir / "ratelimit.toml"
    policy.write_text(POLICIES)
    prefix = f"test:rlmp:{uuid.uuid4().hex}:"
    env = {
        "MERCATO_DATABASE_URL": url,
        "MERCATO_RATELIMIT_BACKEND": "redis",
        "MERCATO_RATELIMIT_POLICY_FILE": str(policy),
        "MERCATO_RATELIMIT_KEY_PREFIX": prefix,
        # This test is about the limiter: the load shedder must not take requests first.
        "MERCATO_BACKPRESSURE_ENABLED": "false",
        # A shared test machine can be slow enough for the production 100 ms to fail the limiter open,
        # which would admit everything: give Redis time, and check below that no answer was degraded.
        "MERCATO_RATELIMIT_SOCKET_TIMEOUT_S": "3",
        "MERCATO_RATELIMIT_TIMEOUT_S": "4",
    }

    def start(index: int) -> tuple[subprocess.Popen[bytes], str, Path]:
        directory = workdir / f"p{index}"
        directory.mkdir()
        return start_mercato(directory, ["api", "--host", "127.0.0.1"], env)

    with ThreadPoolExecutor(PROCESSES) as pool:
        started = list(pool.map(start, range(PROCESSES)))
    try:
        yield [base_url for _, base_url, _ in started]
    finally:
        for proc, _, _ in started:
            proc.terminate()
        for proc, _, _ in started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


async def hammer(
    bases: list[str], headers: dict[str, str], *, requests: int, clients: int = 24
) -> Counter[str]:
    """`requests` sent by concurrent clients, each to the processes in turn; admitted counts per process."""
    admitted: Counter[str] = Counter()
    outcomes: Counter[int] = Counter()
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            n = queue.pop()
            response = await http.get(f"{bases[n % len(bases)]}/v1/products?limit=1", headers=headers)
            outcomes[response.status_code] += 1
            if response.status_code == 200:
                admitted[bases[n % len(bases)]] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    assert set(outcomes) <= {200, 429}, outcomes
    assert outcomes[429] > 0, f"the limit was never reached ({outcomes}): the test proves nothing"
    assert len(admitted) == len(bases), f"some process admitted nothing: {admitted}"
    return admitted


def test_four_processes_hold_one_global_limit(servers: list[str]) -> None:
    admitted = asyncio.run(hammer(servers, {"X-Tenant-ID": "everyone"}, requests=QUOTA * 3 // 2))
    total = sum(admitted.values())
    print(f"admitted {total} of a global quota of {QUOTA} across {len(servers)} processes: {dict(admitted)}")
    assert abs(total - QUOTA) <= 0.02 * QUOTA, admitted
    for base in servers:
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert "degraded_allowed" not in metrics, f"{base} failed open: the count proves nothing"
        assert (
            'mercato_ratelimit_decisions_total{algorithm="token_bucket",backend="redis",outcome="allowed"}'
            in metrics
        )
