"""The edge limiter in the real app (in process), on the memory backend and on the real Redis.

Limits use hour-long periods so that Redis (which takes time from the server) refills nothing during a test;
the memory backend runs on the container's manual clock.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from mercato.bootstrap import Container, build_container
from mercato.config import RateLimitSettings
from mercato.gateway.app import create_app
from mercato.gateway.ratelimit import RateLimiting
from mercato.kit.auth import Principal
from mercato.kit.clock import ManualClock
from tests.conftest import make_settings

REDIS_URL = "redis://127.0.0.1:6379/0"

POLICIES = """
exempt = ["/v1/rate-limit/status"]

[[rules]]
name = "key"
dimensions = ["api_key"]
match = { path_prefix = "/v1/" }
limit = { rate = 5, period_s = 3600 }

[[rules]]
name = "key-checkout"
dimensions = ["api_key", "route"]
match = { path_prefix = "/v1/checkout", methods = ["POST"] }
limit = { rate = 2, period_s = 3600 }

[[rules]]
name = "tenant"
dimensions = ["tenant"]
match = { path_prefix = "/" }
limit = { rate = 3, period_s = 3600 }

[[rules]]
name = "user"
dimensions = ["user"]
match = { path_regex = "^/v1/(me|products)" }
algorithm = "sliding_window"
limit = { rate = 4, period_s = 3600 }

[[rules]]
name = "login-ip"
dimensions = ["ip"]
match = { path_prefix = "/v1/auth/login", methods = ["POST"] }
limit = { rate = 7, period_s = 3600 }
fail_open = false

[[rules]]
name = "login-account"
dimensions = ["body.email"]
match = { path_prefix = "/v1/auth/login", methods = ["POST"] }
algorithm = "fixed_window"
limit = { rate = 2, period_s = 3600 }
fail_open = false
"""


@dataclass
class Edge:
    http: httpx.AsyncClient
    container: Container
    clock: ManualClock
    policy_file: Path
    limiting: RateLimiting
    issued: dict[str, str] = field(default_factory=dict)

    async def key(self, name: str) -> str:
        """A real API key (an unknown one is refused with 401), one per name."""
        if name not in self.issued:
            assert self.container.api_keys is not None
            self.issued[name] = (await self.container.api_keys.create(name, [])).secret
        return self.issued[name]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"test:rlgw:{uuid.uuid4().hex}:"
    yield value
    redis = Redis.from_url(REDIS_URL)
    keys = [k async for k in redis.scan_iter(match=f"{value}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


async def _edge(
    sqlite_url: str, tmp_path: Path, *, backend: str, prefix: str, redis_url: str = REDIS_URL
) -> AsyncIterator[Edge]:
    policy_file = tmp_path / "ratelimit.toml"
    policy_file.write_text(POLICIES)
    clock = ManualClock()
    settings = make_settings(
        sqlite_url,
        ratelimit=RateLimitSettings(
            policy_file=policy_file,
            backend=backend,  # type: ignore[arg-type]
            redis_url=redis_url,
            key_prefix=prefix,
            reload_interval_s=1.0,
            # Generous: a loaded CI machine can stall a reply past 50 ms, and no test here times Redis out
            # (the store that is down is a closed port, refused at once).
            socket_timeout_s=0.5,
            timeout_s=1.0,
        ),
    )
    container = build_container(settings, clock=clock)
    app = create_app(settings, container=container, configure_logs=False)
    limiting: RateLimiting = app.state.rate_limiting
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4321))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Edge(http, container, clock, policy_file, limiting)
    finally:
        await limiting.aclose()
        await container.close()


@pytest.fixture(params=["memory", "redis"])
async def edge(
    request: pytest.FixtureRequest, sqlite_url: str, tmp_path: Path, prefix: str
) -> AsyncIterator[Edge]:
    async for built in _edge(sqlite_url, tmp_path, backend=request.param, prefix=prefix):
        yield built


@pytest.fixture
async def memory_edge(sqlite_url: str, tmp_path: Path, prefix: str) -> AsyncIterator[Edge]:
    async for built in _edge(sqlite_url, tmp_path, backend="memory", prefix=prefix):
        yield built


@pytest.fixture
async def down_edge(sqlite_url: str, tmp_path: Path, prefix: str) -> AsyncIterator[Edge]:
    async for built in _edge(
        sqlite_url, tmp_path, backend="redis", prefix=prefix, redis_url=f"redis://127.0.0.1:{closed_port()}/0"
    ):
        yield built


def assert_rate_limited(response: httpx.Response, rule: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "/problems/rate-limited"
    assert body["rule"] == rule
    assert body["request_id"] == response.headers["x-request-id"]
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.headers["x-ratelimit-remaining"] == "0"


async def test_headers_count_down_then_429_with_retry_after(edge: Edge) -> None:
    key = {"X-API-Key": await edge.key("partner-1")}
    for remaining in (4, 3, 2, 1, 0):
        response = await edge.http.get("/v1/products", headers=key)
        assert response.status_code == 200, response.text
        assert response.headers["ratelimit-limit"] == response.headers["x-ratelimit-limit"] == "5"
        assert response.headers["ratelimit-remaining"] == str(remaining)
        assert int(response.headers["ratelimit-reset"]) > 0
    assert_rate_limited(await edge.http.get("/v1/products", headers=key), "key")
    # Another key has its own quota; no key at all means the rule does not apply (no headers).
    assert (
        await edge.http.get("/v1/products", headers={"X-API-Key": await edge.key("partner-2")})
    ).status_code == 200
    anonymous = await edge.http.get("/v1/products")
    assert anonymous.status_code == 200
    assert "ratelimit-limit" not in anonymous.headers
    problem = (await edge.http.get("/problems/rate-limited")).json()
    assert problem["type"] == "/problems/rate-limited"


async def test_probes_and_metrics_are_never_limited(edge: Edge) -> None:
    tenant = {"X-Tenant-ID": "acme"}  # the tenant rule covers every path, "/" included
    for _ in range(3):
        assert (await edge.http.get("/v1/products", headers=tenant)).status_code == 200
    assert_rate_limited(await edge.http.get("/v1/products", headers=tenant), "tenant")
    for path in ("/healthz", "/readyz", "/startupz", "/metrics"):
        for _ in range(5):
            response = await edge.http.get(path, headers=tenant)
            assert response.status_code in (200, 503), (path, response.text)  # startupz: no lifespan here
            assert "ratelimit-limit" not in response.headers


async def test_combined_rules_all_must_admit_and_headers_show_the_tightest(edge: Edge) -> None:
    both = {"X-API-Key": await edge.key("partner-3"), "X-Tenant-ID": "globex"}
    first = await edge.http.get("/v1/products", headers=both)
    # key: 4 of 5 left; tenant: 2 of 3 left, the tighter share is reported.
    assert (first.headers["ratelimit-limit"], first.headers["ratelimit-remaining"]) == ("3", "2")
    await edge.http.get("/v1/products", headers=both)
    last = await edge.http.get("/v1/products", headers=both)
    assert last.headers["ratelimit-remaining"] == "0"
    assert_rate_limited(await edge.http.get("/v1/products", headers=both), "tenant")
    # The key still has quota on its own: only the tenant was exhausted.
    alone = await edge.http.get("/v1/products", headers={"X-API-Key": await edge.key("partner-3")})
    assert alone.status_code == 200
    assert alone.headers["ratelimit-remaining"] == "0"  # 5 used: 3 with the tenant, 1 refused, 1 now


async def test_checkout_has_its_own_per_key_per_route_limit(edge: Edge) -> None:
    key = {"X-API-Key": await edge.key("partner-4"), "Idempotency-Key": "k"}
    for _ in range(2):
        response = await edge.http.post("/v1/checkout", headers=key)
        assert response.status_code != 429, response.text  # the route answers (401: no user)
        assert response.headers["ratelimit-limit"] == "2"
    assert_rate_limited(await edge.http.post("/v1/checkout", headers=key), "key-checkout")
    # Other routes only see the per-key limit (3 of 5 used by the checkouts).
    other = await edge.http.get("/v1/products", headers={"X-API-Key": await edge.key("partner-4")})
    assert other.status_code == 200
    assert (other.headers["ratelimit-limit"], other.headers["ratelimit-remaining"]) == ("5", "1")


async def test_login_is_limited_per_account_and_per_ip(edge: Edge) -> None:
    password = "correct horse battery"
    ada = f"ada-{uuid.uuid4().hex[:8]}@example.com"  # the SQLite database is shared by the session
    registered = await edge.http.post("/v1/auth/register", json={"email": ada, "password": password})
    assert registered.status_code == 201, registered.text
    # The limiter read the body for the account and the route still got it whole.
    ok = await edge.http.post("/v1/auth/login", json={"email": ada, "password": password})
    assert ok.status_code == 200, ok.text
    assert ok.json()["token_type"] == "bearer"
    wrong = await edge.http.post("/v1/auth/login", json={"email": ada, "password": "guess-1"})
    assert wrong.status_code == 401
    # Two attempts per account; case and spaces do not make a new account.
    assert_rate_limited(
        await edge.http.post("/v1/auth/login", json={"email": " " + ada.upper(), "password": password}),
        "login-account",
    )
    # Seven per address (the refused attempt counted too): three more accounts, then the address is out.
    for n in range(3):
        attempt = await edge.http.post("/v1/auth/login", json={"email": f"u{n}@example.com", "password": "x"})
        assert attempt.status_code == 401, attempt.text
    attempt = await edge.http.post("/v1/auth/login", json={"email": "u9@example.com", "password": "x"})
    assert attempt.status_code == 401
    assert_rate_limited(
        await edge.http.post("/v1/auth/login", json={"email": "new@example.com", "password": "x"}), "login-ip"
    )
    # Malformed bodies still reach the route's validation (no account: only the address rule applies).
    other_ip = httpx.ASGITransport(app=edge.http._transport.app, client=("198.51.100.1", 1))  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=other_ip, base_url="http://test") as http:
        bad = await http.post(
            "/v1/auth/login", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400, bad.text


async def test_status_reports_standing_without_consuming(edge: Edge) -> None:
    assert edge.container.signing_keys is not None
    await edge.container.signing_keys.ready()
    token = edge.container.token_codec.issue(Principal(subject="user-42")).token
    caller = {"X-API-Key": await edge.key("partner-5"), "Authorization": f"Bearer {token}"}
    await edge.http.get("/v1/products", headers=caller)
    for _ in range(2):  # asking twice changes nothing
        status = await edge.http.get("/v1/rate-limit/status", headers=caller)
        assert status.status_code == 200, status.text
        assert status.headers["cache-control"] == "private, no-store"
        rules = {r["rule"]: r for r in status.json()["rules"]}
        assert set(rules) == {"key", "user", "login-ip"}  # every rule keyed on something the caller is
        assert rules["login-ip"]["dimensions"] == {"ip": "203.0.113.7"}
        assert (rules["key"]["limit"], rules["key"]["remaining"], rules["key"]["allowed"]) == (5, 4, True)
        assert rules["user"]["remaining"] == 3
        assert rules["user"]["dimensions"] == {"user": "user-42"}
        assert rules["key"]["dimensions"]["api_key"].startswith("h:")  # the key itself is never echoed
    about_checkout = await edge.http.get(
        "/v1/rate-limit/status", params={"path": "/v1/checkout", "method": "POST"}, headers=caller
    )
    rules = {r["rule"]: r for r in about_checkout.json()["rules"]}
    assert set(rules) == {"key", "key-checkout"}
    assert rules["key-checkout"]["dimensions"]["route"] == "/v1/checkout"
    assert rules["key-checkout"]["remaining"] == 2
    # A bad token is "no user": the user rule does not apply, and the route (not the limiter) decides.
    forged = await edge.http.get("/v1/rate-limit/status", headers={"Authorization": "Bearer nope"})
    assert [r["rule"] for r in forged.json()["rules"]] == ["login-ip"]


def _rewrite(path: Path, text: str, *, mtime_step_s: int) -> None:
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + mtime_step_s * 1_000_000_000))


async def test_policy_file_reloads_and_an_invalid_file_is_kept_out(memory_edge: Edge) -> None:
    edge = memory_edge
    key = {"X-API-Key": await edge.key("partner-6")}
    assert (await edge.http.get("/v1/products", headers=key)).headers["ratelimit-limit"] == "5"
    _rewrite(
        edge.policy_file,
        POLICIES.replace("rate = 5, period_s = 3600", "rate = 50, period_s = 3600"),
        mtime_step_s=5,
    )
    # Not before the check interval: the file is looked at most once a second here.
    assert (await edge.http.get("/v1/products", headers=key)).headers["ratelimit-limit"] == "5"
    edge.clock.advance(1.5)
    assert (await edge.http.get("/v1/products", headers=key)).headers["ratelimit-limit"] == "50"
    for broken in ("[[rules]\nname = ", POLICIES.replace('"sliding_window"', '"nonsense"')):
        _rewrite(edge.policy_file, broken, mtime_step_s=10)
        edge.clock.advance(1.5)
        response = await edge.http.get("/v1/products", headers=key)
        assert response.headers["ratelimit-limit"] == "50"  # the previous policies stay in force
        assert edge.limiting.enforcer.store.last_error
    metrics = (await edge.http.get("/metrics")).text
    assert 'mercato_ratelimit_policy_reloads_total{outcome="applied"} 1.0' in metrics
    assert 'mercato_ratelimit_policy_reloads_total{outcome="rejected"} 2.0' in metrics


async def test_redis_down_fails_open_or_closed_per_rule_and_readyz_says_degraded(down_edge: Edge) -> None:
    edge = down_edge
    # Fail-open rule (per key): admitted, flagged in metrics.
    for _ in range(6):  # past the breaker's threshold of 5 failures
        response = await edge.http.get("/v1/products", headers={"X-API-Key": await edge.key("partner-7")})
        assert response.status_code == 200, response.text
    # Fail-closed rules (login): refused with 503 and Retry-After, not a 429 the client earned.
    login = await edge.http.post("/v1/auth/login", json={"email": "ada@example.com", "password": "whatever"})
    assert login.status_code == 503, login.text
    assert login.json()["type"] == "/problems/dependency-unavailable"
    assert int(login.headers["retry-after"]) >= 1
    # Ready, degraded: every node shares the store and fails open on all but two login rules, so pulling
    # this one from the load balancer would only take serving capacity away (ADR 0026).
    ready = await edge.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "degraded"
    checks = {c["name"]: c for c in ready.json()["checks"]}
    assert (checks["ratelimit"]["ok"], checks["ratelimit"]["status"]) == (True, "degraded")
    assert "login-ip" in checks["ratelimit"]["error"]
    assert checks["database"]["status"] == "ok"
    assert (await edge.http.get("/healthz")).status_code == 200  # liveness is not readiness
    metrics = (await edge.http.get("/metrics")).text
    assert 'mercato_ratelimit_degraded{algorithm="token_bucket",backend="redis"} 1.0' in metrics
    assert 'outcome="degraded_allowed"' in metrics
    assert 'mercato_ratelimit_requests_total{outcome="unavailable",rule="login-ip"}' in metrics or (
        'mercato_ratelimit_requests_total{outcome="unavailable",rule="login-account"}' in metrics
    )
