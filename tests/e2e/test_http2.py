"""Guide §28 "Enable HTTP/2 for multiplexing": `mercato api --http2` in its own process, fresh SQLite file.

- Over TLS (a self-signed certificate made by `cryptography` for this test) the server offers h2 and
  http/1.1 by ALPN: an HTTP/2 client gets HTTP/2, an HTTP/1.1-only client still gets HTTP/1.1.
- Concurrent requests from one HTTP/2 client share one TCP connection, counted on the server's side of
  the socket table; the same burst over HTTP/1.1 needs several.
- Errors keep their problem+json shape over HTTP/2; `--http2` without a certificate is refused (exit 2).
- `--h2c --workers 2`: cleartext HTTP/2 (prior knowledge) from hypercorn's multi-process runner, and a
  graceful exit 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mercato.lab.network import self_signed_certificate
from tests.conftest import TEST_SECRET
from tests.e2e.conftest import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(importlib.util.find_spec(name) for name in ("hypercorn", "h2", "cryptography")),
        reason="needs the dev extra (hypercorn, h2, cryptography)",
    ),
]

PRODUCTS = 30


@dataclass(frozen=True)
class Http2Api:
    port: int
    certificate: Path
    log: Path

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificate))


def _env(database: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(
        {
            "MERCATO_ENV": "test",
            "MERCATO_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            "MERCATO_AUTH_SECRET": TEST_SECRET,
            "MERCATO_AUTH_ARGON2_TIME_COST": "1",
            "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
            "MERCATO_SEED_PRODUCTS": str(PRODUCTS),
            "MERCATO_TELEMETRY_LOG_LEVEL": "warning",
        }
    )
    return env


def _mercato(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mercato.cli.main", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _start_api(workdir: Path, env: dict[str, str], port: int, *args: str) -> subprocess.Popen[bytes]:
    log = workdir / "api.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mercato.cli.main", "api", "--port", str(port), *args],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(process: subprocess.Popen[bytes], log: Path, client: httpx.Client) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, f"mercato api exited early:\n{log.read_text()}"
        try:
            if client.get("/startupz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"mercato api did not become ready:\n{log.read_text()}"
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh SQLite file, migrated and seeded by the CLI as an operator would."""
    workdir = tmp_path_factory.mktemp("h2db")
    path = workdir / "mercato.db"
    for command in ("migrate", "seed"):
        result = _mercato(workdir, _env(path), command)
        assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("h2tls"))


@pytest.fixture(scope="module")
def api(
    database: Path, certificate: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Http2Api]:
    workdir = tmp_path_factory.mktemp("h2api")
    port = free_port()
    cert, key = certificate
    process = _start_api(
        workdir, _env(database), port, "--http2", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)
    )
    running = Http2Api(port=port, certificate=cert, log=workdir / "api.log")
    try:
        with httpx.Client(base_url=running.base_url, verify=running.trust(), timeout=2.0) as probe:
            _wait_ready(process, running.log, probe)
        yield running
    finally:
        _stop(process)


def _server_side_connections(port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is the server's: the connections the server accepted."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":
                    count += 1
    return count


async def test_probes_and_the_catalog_are_served_over_http2(api: Http2Api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, verify=api.trust(), http2=True, timeout=10) as http:
        health = await http.get("/healthz")
        products = await http.get("/v1/products", params={"limit": 10})
    assert health.status_code == 200
    assert health.http_version == "HTTP/2"
    assert products.status_code == 200
    assert products.http_version == "HTTP/2"
    assert len(products.json()["items"]) == 10
    tls = products.extensions["network_stream"].get_extra_info("ssl_object")
    assert tls.selected_alpn_protocol() == "h2"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts sockets in Linux's /proc/net/tcp")
async def test_concurrent_requests_are_multiplexed_over_one_connection(api: Http2Api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, verify=api.trust(), http2=True, timeout=10) as http:
        burst = await asyncio.gather(*(http.get("/v1/products", params={"limit": 5 + i}) for i in range(20)))
        assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in burst)
        assert [len(r.json()["items"]) for r in burst] == [5 + i for i in range(20)]
        assert len({id(r.extensions["network_stream"]) for r in burst}) == 1
        # Measured while the client still holds its connection open.
        assert _server_side_connections(api.port) == 1


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts sockets in Linux's /proc/net/tcp")
async def test_http11_clients_are_still_served_and_need_a_connection_per_request_in_flight(
    api: Http2Api,
) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, verify=api.trust(), timeout=10) as http:
        burst = await asyncio.gather(*(http.get("/v1/products", params={"limit": 5}) for _ in range(10)))
        assert all(r.status_code == 200 and r.http_version == "HTTP/1.1" for r in burst)
        tls = burst[0].extensions["network_stream"].get_extra_info("ssl_object")
        assert tls.selected_alpn_protocol() == "http/1.1"
        # Without multiplexing, requests in flight together each take a connection of their own.
        assert len({id(r.extensions["network_stream"]) for r in burst}) > 1
        assert _server_side_connections(api.port) > 1


async def test_errors_are_problem_json_over_http2(api: Http2Api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, verify=api.trust(), http2=True, timeout=10) as http:
        missing = await http.get("/v1/products/does-not-exist", headers={"X-Request-ID": "h2-probe-1"})
    assert missing.http_version == "HTTP/2"
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    problem = missing.json()
    assert problem["status"] == 404
    assert problem["type"] == "/problems/product-not-found"
    assert problem["request_id"] == "h2-probe-1"
    assert missing.headers["x-request-id"] == "h2-probe-1"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param([], "--http2 needs --ssl-certfile and --ssl-keyfile", id="http2-without-certificate"),
        pytest.param(["--h2c"], "--h2c goes with --http2", id="h2c-without-http2"),
        pytest.param(["--http2", "--h2c", "CERTS"], "--h2c is cleartext", id="h2c-with-certificate"),
    ],
)
def test_unsound_http2_options_are_usage_errors(
    database: Path,
    certificate: tuple[Path, Path],
    tmp_path: Path,
    extra: list[str],
    message: str,
) -> None:
    args = ["api", "--port", str(free_port())]
    if not extra:
        args.append("--http2")
    for arg in extra:
        if arg == "CERTS":
            args += ["--ssl-certfile", str(certificate[0]), "--ssl-keyfile", str(certificate[1])]
        else:
            args.append(arg)
    result = _mercato(tmp_path, _env(database), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split())


def test_cleartext_h2c_with_several_workers_then_a_graceful_stop(database: Path, tmp_path: Path) -> None:
    port = free_port()
    process = _start_api(tmp_path, _env(database), port, "--http2", "--h2c", "--workers", "2")
    try:
        # http1=False: HTTP/2 with prior knowledge, the only cleartext HTTP/2 httpx speaks.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", http1=False, http2=True, timeout=2.0) as http:
            _wait_ready(process, tmp_path / "api.log", http)
            responses = [http.get("/v1/products", params={"limit": 3}) for _ in range(4)]
        assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in responses)
        assert all(len(r.json()["items"]) == 3 for r in responses)
    finally:
        started = time.monotonic()
        code = _stop(process)
    assert code == 0, (tmp_path / "api.log").read_text()
    assert time.monotonic() - started < 15, "an idle server should stop well inside its grace period"


def test_without_hypercorn_the_cli_still_starts_and_http2_is_a_clear_error(
    database: Path, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # A None entry in sys.modules makes the import system treat hypercorn as not installed.
    without_hypercorn = (
        "import sys; sys.modules['hypercorn'] = None; sys.argv[0] = 'mercato'; "
        "from mercato.cli.main import app; app()"
    )
    cert, key = certificate
    args = ["api", "--http2", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    result = subprocess.run(
        [sys.executable, "-c", without_hypercorn, *args, "--port", str(free_port())],
        cwd=tmp_path,
        env=_env(database),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'mercato[http2]'" in " ".join(result.stderr.split())
