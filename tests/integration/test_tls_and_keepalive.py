"""Guide §28 at work: the API served over TLS, and the provider clients reusing their connections.

- `mercato api --ssl-certfile/--ssl-keyfile` in its own process serves HTTPS with a self-signed
  certificate made by `cryptography` for this test.
- The shop's PSP client (built by `bootstrap` from `MERCATO_NETWORK_CLIENT_*`) against the real PSP app
  under uvicorn: the server records the source port of every request, so it counts the TCP connections
  the client really opened.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from mercato.bootstrap import Container, build_container
from mercato.config import NetworkSettings
from mercato.kit.ports import free_port
from mercato.lab.network import self_signed_certificate
from mercato.providers.config import ProviderSettings
from mercato.providers.psp.app import create_psp_app
from tests.conftest import TEST_SECRET, make_settings

# --- TLS termination by `mercato api` ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def _api_env(sqlite_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "MERCATO_ENV": "test",
        "MERCATO_DATABASE_URL": sqlite_url,
        "MERCATO_AUTH_SECRET": TEST_SECRET,
        "MERCATO_TELEMETRY_LOG_LEVEL": "warning",
    }


@pytest.fixture(scope="module")
def https_api(
    sqlite_url: str, certificate: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    cert, key = certificate
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mercato.cli.main",
                "api",
                "--port",
                str(port),
                "--ssl-certfile",
                str(cert),
                "--ssl-keyfile",
                str(key),
            ],
            env=_api_env(sqlite_url),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=20)


async def test_the_api_serves_https_with_the_given_certificate(
    https_api: int, certificate: tuple[Path, Path]
) -> None:
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    async with httpx.AsyncClient(base_url=f"https://localhost:{https_api}", verify=trust) as http:
        responses = [await http.get("/healthz") for _ in range(5)]
        assert all(r.status_code == 200 for r in responses)
        stream = responses[0].extensions["network_stream"]
        assert stream.get_extra_info("ssl_object").version() in {"TLSv1.2", "TLSv1.3"}
        # One TLS connection carried all five requests (HTTP/1.1 keep-alive over TLS).
        assert {id(r.extensions["network_stream"]) for r in responses} == {id(stream)}
        problem = await http.get("/v1/products/does-not-exist")
        assert problem.headers["content-type"] == "application/problem+json"


async def test_a_client_that_does_not_trust_the_certificate_is_refused(https_api: int) -> None:
    async with httpx.AsyncClient(base_url=f"https://localhost:{https_api}") as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get("/healthz")


async def test_plain_http_to_the_tls_port_gets_no_answer(https_api: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{https_api}") as http:
        with pytest.raises(httpx.TransportError):
            await http.get("/healthz")


def test_a_certificate_without_its_key_is_a_usage_error(
    sqlite_url: str, certificate: tuple[Path, Path]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mercato.cli.main", "api", "--ssl-certfile", str(certificate[0])],
        env=_api_env(sqlite_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--ssl-certfile and --ssl-keyfile go together" in result.stderr


# --- connection reuse by the provider clients --------------------------------------------------------------


@dataclass
class PeerLog:
    """Wraps the real PSP app: notes the (address, source port) of every HTTP request."""

    app: ASGIApp
    peers: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("client"):
            self.peers.append(tuple(scope["client"]))  # type: ignore[arg-type]
        await self.app(scope, receive, send)

    @property
    def connections(self) -> int:
        return len(set(self.peers))


@dataclass
class Psp:
    log: PeerLog
    port: int


@pytest.fixture
async def psp(tmp_path: Path) -> AsyncIterator[Psp]:
    log = PeerLog(create_psp_app(f"sqlite+aiosqlite:///{tmp_path / 'psp.db'}"))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(log, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started
    try:
        yield Psp(log, port)
    finally:
        server.should_exit = True
        await serving


def _container(sqlite_url: str, psp: Psp, network: NetworkSettings) -> Container:
    settings = make_settings(
        sqlite_url, providers=ProviderSettings(psp_port=psp.port, enabled=False), network=network
    )
    return build_container(settings)


async def test_sequential_provider_calls_share_one_connection(sqlite_url: str, psp: Psp) -> None:
    container = _container(sqlite_url, psp, NetworkSettings())
    try:
        for _ in range(25):
            await container.psp.summary()
    finally:
        await container.close()
    assert len(psp.log.peers) == 25
    assert psp.log.connections == 1


async def test_concurrent_calls_stay_within_the_configured_pool(sqlite_url: str, psp: Psp) -> None:
    container = _container(sqlite_url, psp, NetworkSettings(client_max_connections=3))
    try:
        await asyncio.gather(*(container.psp.summary() for _ in range(30)))
        await asyncio.gather(*(container.psp.summary() for _ in range(30)))
    finally:
        await container.close()
    assert len(psp.log.peers) == 60
    assert 1 <= psp.log.connections <= 3


async def test_idle_connections_expire_after_the_configured_time(sqlite_url: str, psp: Psp) -> None:
    container = _container(sqlite_url, psp, NetworkSettings(client_keepalive_expiry_s=0.2))
    try:
        await container.psp.summary()
        await container.psp.summary()
        assert psp.log.connections == 1
        await asyncio.sleep(0.5)
        await container.psp.summary()
    finally:
        await container.close()
    assert psp.log.connections == 2


def test_the_default_idle_expiry_is_under_the_servers_keepalive_timeout() -> None:
    # uvicorn closes an idle connection after timeout_keep_alive; a client reusing it later races that close.
    assert NetworkSettings().client_keepalive_expiry_s < uvicorn.Config(app=None).timeout_keep_alive  # type: ignore[arg-type]
