"""The generator for ~1 s at a low rate against a bare baseline server started in-process."""

from __future__ import annotations

import asyncio
import time

import uvicorn

from mercato.bench.baseline import BARE_PATH, create_starlette_app
from mercato.bench.client import GeneratorConfig, OpenLoopGenerator
from mercato.bench.stats import LatencyHistogram
from mercato.kit.ports import free_port


async def test_generator_counts_add_up_against_the_bare_baseline() -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_starlette_app(), host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(250):  # up to 5 s for the server to start listening
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started
    try:
        config = GeneratorConfig(
            port=port,
            paths=(BARE_PATH, "/missing"),  # every other request is a 404: a non-2xx error
            rate_per_s=100.0,
            duration_s=1.0,
            t0_s=time.monotonic() + 0.1,
            max_connections=8,
            warm_connections=2,
        )
        result = await OpenLoopGenerator(config).run()
    finally:
        server.should_exit = True
        await serving
    counts = result.counts
    hist = LatencyHistogram.merged([result.histogram])
    assert counts.scheduled == 100
    assert counts.sent == 100
    assert counts.ok == 50
    assert counts.non_2xx == 50
    assert counts.non_2xx_statuses == {404: 50}
    assert counts.transport_errors == counts.timeouts == 0
    assert counts.finished == counts.scheduled == hist.count
    assert 0 < hist.percentile_ms(50) < 100
    assert counts.last_done_s >= config.t0_s + 0.99
    assert counts.wall_s >= 0.99
