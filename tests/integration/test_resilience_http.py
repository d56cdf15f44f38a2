"""ResilientHttpClient against a real HTTP server on a 127.0.0.1 port (uvicorn in a thread).

The server fails N times then succeeds, counts attempts and echoes the deadline header it received;
a /proxy route runs our own DeadlineMiddleware and ResilientHttpClient to show the deadline shrinking
across a hop.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mercato.kit.clock import SystemClock
from mercato.kit.resilience import (
    DEADLINE_HEADER,
    BreakerConfig,
    CircuitBreaker,
    DeadlineMiddleware,
    HedgeConfig,
    ResiliencePolicy,
    ResilientHttpClient,
    RetryBudget,
    RetryPolicy,
    deadline_scope,
)


@dataclass
class Upstream:
    base_url: str
    attempts: dict[str, int] = field(default_factory=dict)
    deadlines: dict[str, list[str | None]] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _build_app(upstream: Upstream) -> Starlette:
    def count(request: Request) -> tuple[str, int]:
        key = request.path_params["key"]
        upstream.attempts[key] = upstream.attempts.get(key, 0) + 1
        upstream.deadlines.setdefault(key, []).append(request.headers.get(DEADLINE_HEADER))
        return key, upstream.attempts[key]

    async def flaky(request: Request) -> JSONResponse:
        _, attempt = count(request)
        if attempt <= int(request.query_params.get("fail", "0")):
            return JSONResponse({"error": "unavailable"}, status_code=503)
        return JSONResponse({"attempt": attempt, "deadline_ms": request.headers.get(DEADLINE_HEADER)})

    async def slow_first(request: Request) -> JSONResponse:
        _, attempt = count(request)
        if attempt == 1:
            await asyncio.sleep(float(request.query_params["first_s"]))
        return JSONResponse({"attempt": attempt})

    async def proxy(request: Request) -> JSONResponse:
        received = request.headers.get(DEADLINE_HEADER)
        async with httpx.AsyncClient(base_url=upstream.base_url) as inner:
            client = ResilientHttpClient(
                inner, policy=ResiliencePolicy("self", retry=RetryPolicy(timeout_s=5.0))
            )
            response = await client.get(f"/flaky/{request.path_params['key']}")
        return JSONResponse({"received_ms": received, "forwarded_ms": response.json()["deadline_ms"]})

    app = Starlette(
        routes=[
            Route("/flaky/{key}", flaky, methods=["GET", "POST"]),
            Route("/slow/{key}", slow_first),
            Route("/proxy/{key}", proxy),
        ]
    )
    app.add_middleware(DeadlineMiddleware, max_timeout_s=10.0)
    return app


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    port = _free_port()
    state = Upstream(base_url=f"http://127.0.0.1:{port}")
    config = uvicorn.Config(
        _build_app(state),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(250):
        if server.started:
            break
        time.sleep(0.02)
    assert server.started
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=5)


async def _no_sleep(seconds: float) -> None:
    return None


def _client(
    upstream: Upstream, *, timeout_s: float = 2.0, max_attempts: int = 3, **policy_options: object
) -> ResilientHttpClient:
    clock = SystemClock()
    policy = ResiliencePolicy(
        "upstream",
        retry=RetryPolicy(max_attempts=max_attempts, timeout_s=timeout_s, base_s=0.001, cap_s=0.01),
        breaker=CircuitBreaker("upstream", config=BreakerConfig(minimum_calls=50), clock=clock),
        budget=RetryBudget(ratio=0.1, min_retries_per_s=0.0, initial_tokens=10.0, clock=clock),
        clock=clock,
        **policy_options,  # type: ignore[arg-type]
    )
    return ResilientHttpClient(httpx.AsyncClient(base_url=upstream.base_url), policy=policy, hedge_reads=True)


def _key() -> str:
    return uuid.uuid4().hex


async def test_get_fails_twice_then_succeeds_and_each_attempt_carries_the_deadline(
    upstream: Upstream,
) -> None:
    client, key = _client(upstream), _key()
    with deadline_scope(timeout_s=1.5):
        response = await client.get(f"/flaky/{key}", params={"fail": "2"})
    assert response.status_code == 200
    assert response.json()["attempt"] == 3
    assert upstream.attempts[key] == 3
    sent = [int(value) for value in upstream.deadlines[key] if value is not None]
    assert len(sent) == 3
    assert all(0 < ms <= 1500 for ms in sent)
    assert sent == sorted(sent, reverse=True)  # the budget only shrinks from attempt to attempt
    breaker = client.policy.breaker
    assert breaker is not None
    assert breaker.snapshot()["failures"] == 2


async def test_without_a_request_deadline_the_attempt_timeout_is_sent(upstream: Upstream) -> None:
    client, key = _client(upstream, timeout_s=0.8), _key()
    response = await client.get(f"/flaky/{key}")
    assert 700 <= int(response.json()["deadline_ms"]) <= 800


async def test_post_is_retried_only_with_an_idempotency_key(upstream: Upstream) -> None:
    client = _client(upstream)
    plain, keyed = _key(), _key()
    assert (await client.post(f"/flaky/{plain}", params={"fail": "1"}, json={})).status_code == 503
    assert upstream.attempts[plain] == 1
    response = await client.post(
        f"/flaky/{keyed}", params={"fail": "1"}, json={}, headers={"Idempotency-Key": "order-42"}
    )
    assert response.status_code == 200
    assert upstream.attempts[keyed] == 2


async def test_a_slow_attempt_times_out_and_the_retry_succeeds(upstream: Upstream) -> None:
    client, key = _client(upstream, timeout_s=0.1, max_attempts=2), _key()
    started = time.perf_counter()
    response = await client.get(f"/slow/{key}", params={"first_s": "0.5"}, hedge=False)
    assert response.json() == {"attempt": 2}
    assert time.perf_counter() - started < 0.45
    breaker = client.policy.breaker
    assert breaker is not None
    assert breaker.snapshot()["failures"] == 1


async def test_a_hedged_read_beats_the_slow_primary(upstream: Upstream) -> None:
    client, key = _client(upstream, hedge=HedgeConfig(fallback_delay_s=0.02)), _key()
    started = time.perf_counter()
    response = await client.get(f"/slow/{key}", params={"first_s": "0.5"})
    assert response.json() == {"attempt": 2}
    assert time.perf_counter() - started < 0.45
    assert upstream.attempts[key] == 2


async def test_connection_errors_are_retried_then_raised() -> None:
    closed = Upstream(base_url=f"http://127.0.0.1:{_free_port()}")
    client = _client(closed, sleep=_no_sleep)
    with pytest.raises(httpx.ConnectError):
        await client.get("/anything")
    breaker = client.policy.breaker
    assert breaker is not None
    assert breaker.snapshot()["failures"] == 3


async def test_the_deadline_shrinks_across_a_hop(upstream: Upstream) -> None:
    client, key = _client(upstream), _key()
    with deadline_scope(timeout_s=0.9):
        response = await client.get(f"/proxy/{key}")
    body = response.json()
    received, forwarded = int(body["received_ms"]), int(body["forwarded_ms"])
    assert 0 < forwarded <= received <= 900
