"""Trusted proxies through the real app on a real socket (ADR 0019).

uvicorn serves the app on 127.0.0.1; clients connect from distinct loopback source addresses, so the
socket peer the server sees is real: 127.0.0.2 plays the trusted reverse proxy, 127.0.0.3 a client
that connects directly and forges `X-Forwarded-For`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from mercato.config import HttpSettings, NetworkSettings, RateLimitSettings
from mercato.gateway.app import create_app
from mercato.kit.observability import configure_logging
from mercato.kit.ports import free_port
from tests.conftest import make_settings

PROXY = "127.0.0.2"
DIRECT = "127.0.0.3"
LOGIN_LIMIT = 3

POLICIES = f"""
[[rules]]
name = "login-ip"
dimensions = ["ip"]
match = {{ path_prefix = "/v1/auth/login", methods = ["POST"] }}
limit = {{ rate = {LOGIN_LIMIT}, period_s = 3600 }}
fail_open = false
"""


@pytest.fixture
async def base_url(sqlite_url: str, tmp_path: Path) -> AsyncIterator[str]:
    policy_file = tmp_path / "ratelimit.toml"
    policy_file.write_text(POLICIES)
    settings = make_settings(
        sqlite_url,
        ratelimit=RateLimitSettings(policy_file=policy_file, backend="memory"),
        network=NetworkSettings(trusted_proxies=[PROXY]),
        http=HttpSettings(access_log=True),
    )
    app = create_app(settings, configure_logs=False)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, proxy_headers=False
        )
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(250):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


def _client(base_url: str, source: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, transport=httpx.AsyncHTTPTransport(local_address=source), timeout=10.0
    )


async def _login(http: httpx.AsyncClient, xff: str | bytes | None = None) -> httpx.Response:
    headers: dict[str, str | bytes] = {"X-Forwarded-For": xff} if xff is not None else {}
    # A different unknown account each time: only the per-address rule can refuse.
    body = {"email": f"nobody-{uuid.uuid4().hex[:8]}@example.com", "password": "wrong-password-1"}
    return await http.post("/v1/auth/login", json=body, headers=headers)


async def test_two_clients_behind_the_trusted_proxy_get_separate_limits(base_url: str) -> None:
    async with _client(base_url, PROXY) as proxy:
        # What nginx's $proxy_add_x_forwarded_for sends: the client's own header, then its address.
        for _ in range(LOGIN_LIMIT):
            assert (await _login(proxy, "198.51.100.9, 203.0.113.1")).status_code == 401
        refused = await _login(proxy, "203.0.113.1")
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        # Another client behind the same proxy has its own quota...
        for _ in range(LOGIN_LIMIT):
            assert (await _login(proxy, "203.0.113.2")).status_code == 401
        # ...and the first one cannot escape by putting another address in front of its own.
        assert (await _login(proxy, "203.0.113.77, 203.0.113.1")).status_code == 429


async def test_a_direct_client_forging_the_header_is_limited_by_its_real_address(base_url: str) -> None:
    async with _client(base_url, DIRECT) as direct:
        statuses = [(await _login(direct, f"203.0.113.{i}")).status_code for i in range(LOGIN_LIMIT + 3)]
    assert statuses == [401] * LOGIN_LIMIT + [429] * 3
    async with _client(base_url, PROXY) as proxy:
        # Forged addresses consumed nothing of the real ones' quotas.
        assert (await _login(proxy, "203.0.113.0")).status_code == 401


@pytest.mark.parametrize(
    "xff", ["", "not-an-ip", "203.0.113.5:99999", "[::1", ", , ,", "a" * 4000, "203.0.113.5, ☃".encode()]
)
async def test_malformed_headers_from_the_proxy_fall_back_to_the_proxy(
    base_url: str, xff: str | bytes
) -> None:
    async with _client(base_url, PROXY) as proxy:
        statuses = [(await _login(proxy, xff)).status_code for _ in range(LOGIN_LIMIT + 1)]
    # Never a 500: the walk stops at the proxy, whose address is then the (shared) key.
    assert statuses == [401] * LOGIN_LIMIT + [429]


async def test_logs_name_the_resolved_client_and_the_peer(
    base_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="info", fmt="json")
    capfd.readouterr()
    async with _client(base_url, PROXY) as proxy:
        await proxy.get("/healthz", headers={"X-Forwarded-For": "203.0.113.50", "X-Request-ID": "xff-log-1"})
    async with _client(base_url, DIRECT) as direct:
        await direct.get("/healthz", headers={"X-Forwarded-For": "203.0.113.51", "X-Request-ID": "xff-log-2"})
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("event") == "http_request"}
    # Logs keep networks, not addresses (personal data): the /24 of each.
    assert access["xff-log-1"]["client_net"] == "203.0.113.0/24"
    assert access["xff-log-1"]["peer_net"] == "127.0.0.0/24"
    assert access["xff-log-2"]["client_net"] == "127.0.0.0/24"
    assert "peer_net" not in access["xff-log-2"]
    assert not any(DIRECT in str(line) or "203.0.113.50" in str(line) for line in access.values())
