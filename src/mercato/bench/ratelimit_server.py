"""The servers of ``mercato bench ratelimit``'s overhead comparison: the bare endpoint served without a
limiter, behind a token bucket in memory, or behind one in Redis (``MERCATO_BENCH_RL_*`` pick which).

``python -m mercato.bench.ratelimit_server --port N --variant bare|memory|redis [--workers W]`` serves one
variant."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercato.bench.baseline import BARE_PATH, create_starlette_app
from mercato.bench.servers import (
    ServerProcess,
    _clean_env,
    free_port,
    start_server,
)
from mercato.kit.ratelimit import Limit, RateLimiter, build_limiter

VARIANTS = ("bare", "memory", "redis")
ENDPOINTS = ("empty", "product")
# Far above any rate the machine can serve: every request is admitted, so only the decision's cost shows.
NEVER_LIMITS = Limit(rate=10_000_000, period_s=1.0, burst=10_000_000)
KEYS = 1000
ENV_VARIANT = "MERCATO_BENCH_RL_VARIANT"
ENV_REDIS = "MERCATO_BENCH_RL_REDIS_URL"
ENV_PREFIX = "MERCATO_BENCH_RL_PREFIX"


class LimitedApp:
    """The endpoint behind a limiter: one `hit` per request, keyed by the query string, headers added."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, limit: Limit) -> None:
        self.app = app
        self.limiter = limiter
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = "bench:" + scope.get("query_string", b"").decode("latin-1")
        decision = await self.limiter.hit(key, self.limit)
        headers = decision.header_pairs()
        if not decision.allowed:
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app() -> ASGIApp:
    """The variant named by the environment (uvicorn workers re-import this factory)."""
    variant = os.environ.get(ENV_VARIANT, "bare")
    bare = create_starlette_app()
    if variant == "bare":
        return bare
    limiter = build_limiter(
        "token_bucket",
        variant,
        redis_url=os.environ.get(ENV_REDIS, "redis://127.0.0.1:6379/0"),
        key_prefix=os.environ.get(ENV_PREFIX, "mercato:bench:rl:"),
        fail_open=False,  # a benchmark that silently stopped limiting would measure nothing
        # Capacity, not timeouts, is measured: on a loaded machine the production 100 ms socket timeout
        # opens the breaker and every refusal would count as an error. The p99 SLO still bounds latency.
        socket_timeout_s=1.0,
        timeout_s=2.0,
    )
    return LimitedApp(bare, limiter, NEVER_LIMITS)


def serve(*, port: int, workers: int, variant: str, host: str = "127.0.0.1") -> None:
    os.environ[ENV_VARIANT] = variant
    uvicorn.run(
        "mercato.bench.ratelimit_server:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_config=None,
        proxy_headers=False,
    )


def start_variant(variant: str, *, workdir: Path, workers: int, redis_url: str, prefix: str) -> ServerProcess:
    port = free_port()
    args = ["-m", "mercato.bench.ratelimit_server", "--port", str(port), "--workers", str(workers)]
    args += ["--variant", variant]
    env = _clean_env({ENV_REDIS: redis_url, ENV_PREFIX: prefix})
    return start_server(variant, args, port=port, workdir=workdir, env=env, ready_path=BARE_PATH)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the bare endpoint, optionally behind a limiter.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, default="bare")
    args = parser.parse_args(argv)
    serve(port=args.port, workers=args.workers, variant=args.variant)


if __name__ == "__main__":
    main()
