"""The server side of ``mercato lab network``: the ASGI app every scenario talks to, the servers that run it
(uvicorn for HTTP/1.1 and HTTPS, hypercorn for HTTP/2, each in its own process) and the certificate."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import ipaddress
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from mercato.bench.baseline import answer_lifespan

MAX_DELAY_MS = 1000


# --- the server side --------------------------------------------------------------------------------------


async def lab_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI: reads the body, waits `?delay_ms=` (at most 1 s), answers with the client's source port.

    The port in the answer is how the client counts the connections a scenario really used.
    """
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = bool(message.get("more_body", False)) and message["type"] == "http.request"
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    delay = query.get("delay_ms", ["0"])[0]
    if delay.isdigit() and 0 < int(delay) <= MAX_DELAY_MS:
        await asyncio.sleep(int(delay) / 1000)
    client = scope.get("client")
    body = str(client[1] if client else 0).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def self_signed_certificate(directory: Path, *, hostname: str = "localhost") -> tuple[Path, Path]:
    """(certificate, key) PEM files for `hostname` and 127.0.0.1, valid for a day: an ECDSA P-256 key,
    what most TLS deployments serve today. Needs `cryptography` (the dev and lab extras)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@contextlib.contextmanager
def run_server(argv: list[str], port: int, log: Path, *, startup_timeout_s: float = 30.0) -> Iterator[None]:
    """A server in its own process (it must not share the client's CPU time slice or event loop)."""
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited early: {log.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{argv[0]} did not listen on {port} in {startup_timeout_s} s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def uvicorn_argv(port: int, cert: tuple[Path, Path] | None = None) -> list[str]:
    argv = [
        "uvicorn",
        "mercato.lab.network_servers:lab_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--no-proxy-headers",
        "--log-level",
        "warning",
    ]
    if cert is not None:
        argv += ["--ssl-certfile", str(cert[0]), "--ssl-keyfile", str(cert[1])]
    return argv


def hypercorn_argv(port: int, cert: tuple[Path, Path]) -> list[str]:
    # Over TLS hypercorn offers h2 and http/1.1 by ALPN; the client picks.
    return [
        "hypercorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--certfile",
        str(cert[0]),
        "--keyfile",
        str(cert[1]),
        "--log-level",
        "warning",
        "mercato.lab.network_servers:lab_app",
    ]


def http2_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("hypercorn", "h2"))
