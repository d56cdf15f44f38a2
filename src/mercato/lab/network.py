"""``mercato lab network``: what handshakes cost, and what keep-alive and HTTP/2 save (guide §28).

Hypotheses (guide §28: "DNS lookup, TCP handshake, TLS setup add latency; HTTP versions change
multiplexing and head-of-line behavior"; "use keep-alives"):
- a new TCP connection per request is slower than reusing one (keep-alive), by the handshake plus the
  connection setup on both sides;
- a new TLS connection per request (a full handshake: the client resumes no session) costs far more
  than a TCP one, and TLS keep-alive brings the request back to about the plain keep-alive cost;
- over one connection, HTTP/1.1 serves concurrent requests one at a time (head-of-line) while HTTP/2
  multiplexes them;
- Nagle's algorithm (TCP_NODELAY off) stalls a request written in two small pieces until the first is
  acknowledged, and the receiver delays that acknowledgement.

Method: real servers in their own processes on this machine's loopback (uvicorn for HTTP/1.1 and
HTTPS, hypercorn for HTTP/2, both serving `lab_app` below, which answers with the client's source port
so every scenario counts the connections it really used), a self-signed ECDSA P-256 certificate made
at run time. Clients: httpx, as in Mercato's provider clients, and HTTP/1.1 by hand on blocking sockets,
which separates what the protocol costs from what the client library adds. **Closed loop**: each
scenario sends its requests back to back (one at a time, or `concurrency` at a time for the
multiplexing scenarios), so latency is per request with no queueing from an arrival schedule; req/s is
requests / wall time. Scenarios run round-robin for `rounds` rounds, so load from elsewhere on a shared
machine spreads over all of them instead of skewing whichever was running.
Loopback has no propagation delay: what is measured is the CPU and system-call cost of handshakes, a
floor under what a real network adds (each handshake is also one or two round trips there).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import ipaddress
import json
import os
import platform
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from starlette.types import Receive, Scope, Send

from mercato.bench.baseline import answer_lifespan

__all__ = [
    "ExperimentConfig",
    "NetworkReport",
    "ScenarioResult",
    "http2_available",
    "lab_app",
    "network_command",
    "plot",
    "run_experiment",
    "self_signed_certificate",
]

_MAX_DELAY_MS = 1000


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
    if delay.isdigit() and 0 < int(delay) <= _MAX_DELAY_MS:
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _server(argv: list[str], port: int, log: Path, *, startup_timeout_s: float = 30.0) -> Iterator[None]:
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


def _uvicorn(port: int, cert: tuple[Path, Path] | None = None) -> list[str]:
    argv = [
        "uvicorn",
        "mercato.lab.network:lab_app",
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


def _hypercorn(port: int, cert: tuple[Path, Path]) -> list[str]:
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
        "mercato.lab.network:lab_app",
    ]


def http2_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("hypercorn", "h2"))


# --- measuring --------------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    name: str
    group: str  # httpx | socket | handshake | nagle | http2
    description: str
    requests: int
    concurrency: int
    connections: int  # connections the server saw, from the source ports it reported (0: not counted)
    wall_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    protocol: str = ""

    @property
    def per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class NetworkReport:
    date: str
    mode: str
    host: dict[str, Any]
    tls: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_name(self, name: str) -> ScenarioResult | None:
        return next((s for s in self.scenarios if s.name == name), None)

    def claims(self) -> dict[str, Any]:
        """The comparisons the hypotheses are about: ratios of p50 latency (or of req/s), and what a new
        connection adds to a request's p50, in ms."""

        def ratio(slow: str, fast: str, attr: str = "p50_ms") -> float | None:
            a, b = self.by_name(slow), self.by_name(fast)
            if a is None or b is None or getattr(b, attr) == 0:
                return None
            return round(float(getattr(a, attr)) / float(getattr(b, attr)), 2)

        def added_ms(slow: str, fast: str) -> float | None:
            a, b = self.by_name(slow), self.by_name(fast)
            return None if a is None or b is None else round(a.p50_ms - b.p50_ms, 3)

        return {
            "httpx_new_over_keepalive_p50": ratio("httpx new connection", "httpx keep-alive"),
            "httpx_tls_new_over_keepalive_p50": ratio("httpx TLS new connection", "httpx TLS keep-alive"),
            "socket_new_over_keepalive_p50": ratio("socket new connection", "socket keep-alive"),
            "socket_tls_new_over_keepalive_p50": ratio("socket TLS new connection", "socket TLS keep-alive"),
            "socket_tls_keepalive_over_keepalive_p50": ratio("socket TLS keep-alive", "socket keep-alive"),
            "tls_handshake_over_tcp_connect_p50": ratio("TLS handshake alone", "TCP connect alone"),
            "new_tcp_connection_adds_ms": added_ms("socket new connection", "socket keep-alive"),
            "new_tls_connection_adds_ms": added_ms("socket TLS new connection", "socket TLS keep-alive"),
            "httpx_new_tcp_connection_adds_ms": added_ms("httpx new connection", "httpx keep-alive"),
            "httpx_new_tls_connection_adds_ms": added_ms("httpx TLS new connection", "httpx TLS keep-alive"),
            "h2_over_h1_one_connection_per_s": ratio("h2 1 connection", "h1 1 connection", "per_s"),
            "h2_one_over_h1_n_connections_per_s": ratio("h2 1 connection", "h1 N connections", "per_s"),
            "nagle_over_nodelay_p50": ratio("Nagle on (TCP_NODELAY off)", "TCP_NODELAY on"),
        }

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for scenario, raw in zip(self.scenarios, data["scenarios"], strict=True):
            raw["per_s"] = round(scenario.per_s, 1)
        data["claims"] = self.claims()
        return data


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _result(
    name: str,
    group: str,
    description: str,
    latencies_s: list[float],
    wall_s: float,
    *,
    concurrency: int = 1,
    connections: int = 0,
    protocol: str = "",
) -> ScenarioResult:
    ordered = sorted(x * 1000 for x in latencies_s)
    return ScenarioResult(
        name=name,
        group=group,
        description=description,
        requests=len(ordered),
        concurrency=concurrency,
        connections=connections,
        wall_s=round(wall_s, 4),
        mean_ms=round(sum(ordered) / len(ordered), 4) if ordered else 0.0,
        p50_ms=round(_percentile(ordered, 0.50), 4),
        p90_ms=round(_percentile(ordered, 0.90), 4),
        p99_ms=round(_percentile(ordered, 0.99), 4),
        max_ms=round(ordered[-1], 4) if ordered else 0.0,
        protocol=protocol,
    )


Advance = Callable[[], None]


def _noop() -> None:
    return None


@dataclass
class Sample:
    """Raw measurements of one scenario, merged over the rounds."""

    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    ports: list[str] = field(default_factory=list)  # the source port of each answer, in order
    protocols: set[str] = field(default_factory=set)
    connections: int = 0

    def count_connections(self, *, sequential: bool) -> None:
        """Sequential requests: a new connection wherever the port changes. (Distinct ports would
        undercount: Linux reuses a loopback port still in TIME_WAIT, `net.ipv4.tcp_tw_reuse=2`.)
        Concurrent ones share a pool whose connections stay open, so there: distinct ports."""
        if sequential:
            self.connections = sum(
                1 for i, port in enumerate(self.ports) if i == 0 or port != self.ports[i - 1]
            )
        else:
            self.connections = len(set(self.ports))

    def merge(self, other: Sample) -> None:
        self.latencies_s += other.latencies_s
        self.wall_s += other.wall_s
        self.ports += other.ports
        self.protocols |= other.protocols
        self.connections += other.connections


Runner = Callable[[int, Advance], Awaitable[Sample]]


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str
    description: str
    requests: int  # per round
    run: Runner
    concurrency: int = 1
    counts_connections: bool = True

    def result(self, sample: Sample) -> ScenarioResult:
        return _result(
            self.name,
            self.group,
            self.description,
            sample.latencies_s,
            sample.wall_s,
            concurrency=self.concurrency,
            connections=sample.connections if self.counts_connections else 0,
            protocol="/".join(sorted(sample.protocols)),
        )


async def _closed_loop(
    client: httpx.AsyncClient, url: str, *, requests: int, concurrency: int, advance: Advance
) -> Sample:
    """`concurrency` workers, each sending its next request when the previous answered."""
    sample = Sample()
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await client.get(url)
            sample.latencies_s.append(time.perf_counter() - started)
            response.raise_for_status()
            sample.ports.append(response.text)
            sample.protocols.add(response.http_version)
            advance()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    sample.wall_s = time.perf_counter() - started
    sample.count_connections(sequential=concurrency == 1)
    return sample


def _httpx(
    url: str,
    *,
    limits: httpx.Limits,
    verify: ssl.SSLContext | bool = True,
    http1: bool = True,
    http2: bool = False,
    concurrency: int = 1,
) -> Runner:
    async def run(requests: int, advance: Advance) -> Sample:
        async with httpx.AsyncClient(
            limits=limits, verify=verify, http1=http1, http2=http2, timeout=30.0
        ) as client:
            # Warm-up outside the measurement (imports, the server's first-request paths), at the
            # scenario's concurrency so a pool of several connections is open before timing starts.
            await _closed_loop(
                client,
                url,
                requests=max(concurrency, min(20, requests)),
                concurrency=concurrency,
                advance=_noop,
            )
            return await _closed_loop(
                client, url, requests=requests, concurrency=concurrency, advance=advance
            )

    return run


def _read_response(sock: socket.socket, buffer: bytearray) -> bytes:
    """One HTTP/1.1 response (Content-Length framed, as `lab_app` answers); its body."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer: {head[:80]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        rest += chunk
    buffer[:] = rest[length:]
    return rest[:length]


def _socket(
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    keepalive: bool,
    nodelay: bool = True,
    split_writes: bool = False,
) -> Runner:
    """HTTP/1.1 by hand on a blocking socket (in a thread): what a connection costs without an HTTP
    client library's own per-request work on top. `split_writes` sends a POST's headers and body as two
    writes: the write-write-read pattern Nagle's algorithm and delayed ACKs make wait."""
    host = f"Host: 127.0.0.1:{port}\r\n"
    if split_writes:
        body = b"x" * 100
        writes = [f"POST /nagle HTTP/1.1\r\n{host}Content-Length: {len(body)}\r\n\r\n".encode(), body]
    else:
        writes = [f"GET / HTTP/1.1\r\n{host}\r\n".encode()]

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        return tls.wrap_socket(sock, server_hostname="localhost") if tls is not None else sock

    def exchange(sock: socket.socket, buffer: bytearray) -> str:
        for data in writes:
            sock.sendall(data)
        return _read_response(sock, buffer).decode()  # the source port the server saw

    def measure(requests: int, advance: Advance) -> Sample:
        sample = Sample(protocols={"HTTP/1.1"})
        started = time.perf_counter()
        if keepalive:
            with connect() as sock:
                buffer = bytearray()
                for _ in range(3):  # warm-up
                    exchange(sock, buffer)
                started = time.perf_counter()
                for _ in range(requests):
                    t0 = time.perf_counter()
                    sample.ports.append(exchange(sock, buffer))
                    sample.latencies_s.append(time.perf_counter() - t0)
                    advance()
        else:
            for _ in range(requests):
                t0 = time.perf_counter()
                with connect() as sock:  # the handshake(s) are inside the timing
                    sample.ports.append(exchange(sock, bytearray()))
                sample.latencies_s.append(time.perf_counter() - t0)
                advance()
        sample.wall_s = time.perf_counter() - started
        sample.count_connections(sequential=True)
        return sample

    async def run(requests: int, advance: Advance) -> Sample:
        return await asyncio.to_thread(measure, requests, advance)

    return run


def _handshake(port: int, tls: ssl.SSLContext | None, info: dict[str, Any]) -> Runner:
    """The handshake alone: TCP `connect()` until established, or a full TLS handshake on an open TCP
    connection (the client offers no session to resume). No request."""

    def measure(requests: int, advance: Advance) -> Sample:
        sample = Sample()
        started = time.perf_counter()
        for _ in range(requests):
            if tls is None:
                t0 = time.perf_counter()
                sock = socket.create_connection(("127.0.0.1", port))
                sample.latencies_s.append(time.perf_counter() - t0)
                sock.close()
            else:
                raw = socket.create_connection(("127.0.0.1", port))
                t0 = time.perf_counter()
                with tls.wrap_socket(raw, server_hostname="localhost") as secure:
                    sample.latencies_s.append(time.perf_counter() - t0)
                    if "version" not in info:
                        cipher = secure.cipher()
                        info.update(version=secure.version(), cipher=cipher[0] if cipher else None)
            advance()
        sample.wall_s = time.perf_counter() - started
        return sample

    async def run(requests: int, advance: Advance) -> Sample:
        return await asyncio.to_thread(measure, requests, advance)

    return run


@dataclass(frozen=True)
class ExperimentConfig:
    requests: int = 2000  # per scenario, over all rounds
    rounds: int = 5
    concurrency: int = 16
    delay_ms: int = 5
    http2: bool = True
    nagle: bool = True


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _scenarios(
    config: ExperimentConfig,
    *,
    plain_port: int,
    tls_port: int,
    h2_port: int | None,
    verify: ssl.SSLContext,
    info: dict[str, Any],
) -> list[Scenario]:
    per_round = max(1, config.requests // config.rounds)
    # Slower scenarios get fewer requests so a run stays short: Nagle waits ~40 ms a request, the
    # multiplexing scenarios `delay_ms`.
    nagle_round = max(2, per_round // 20)
    mux_round = max(config.concurrency, per_round // 4)
    plain, secure = f"http://127.0.0.1:{plain_port}/", f"https://localhost:{tls_port}/"
    reuse = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    fresh = httpx.Limits(max_connections=1, max_keepalive_connections=0)
    out = [
        Scenario(
            "httpx keep-alive",
            "httpx",
            "httpx, one connection reused",
            per_round,
            _httpx(plain, limits=reuse),
        ),
        Scenario(
            "httpx new connection",
            "httpx",
            "httpx, a TCP connection per request",
            per_round,
            _httpx(plain, limits=fresh),
        ),
        Scenario(
            "httpx TLS keep-alive",
            "httpx",
            "httpx, one TLS connection reused",
            per_round,
            _httpx(secure, limits=reuse, verify=verify),
        ),
        Scenario(
            "httpx TLS new connection",
            "httpx",
            "httpx, TCP + full TLS handshake per request",
            per_round,
            _httpx(secure, limits=fresh, verify=verify),
        ),
        Scenario(
            "socket keep-alive",
            "socket",
            "raw socket, one connection reused",
            per_round,
            _socket(plain_port, keepalive=True),
        ),
        Scenario(
            "socket new connection",
            "socket",
            "raw socket, a TCP connection per request",
            per_round,
            _socket(plain_port, keepalive=False),
        ),
        Scenario(
            "socket TLS keep-alive",
            "socket",
            "raw socket, one TLS connection reused",
            per_round,
            _socket(tls_port, tls=verify, keepalive=True),
        ),
        Scenario(
            "socket TLS new connection",
            "socket",
            "raw socket, TCP + full TLS handshake per request",
            per_round,
            _socket(tls_port, tls=verify, keepalive=False),
        ),
        Scenario(
            "TCP connect alone",
            "handshake",
            "connect() until established, no request",
            per_round,
            _handshake(plain_port, None, info),
            counts_connections=False,
        ),
        Scenario(
            "TLS handshake alone",
            "handshake",
            "full TLS 1.3 handshake on an open connection, no request",
            per_round,
            _handshake(tls_port, verify, info),
            counts_connections=False,
        ),
    ]
    if config.nagle:
        out += [
            Scenario(
                "TCP_NODELAY on",
                "nagle",
                "POST as two writes (headers, body), one connection",
                nagle_round,
                _socket(plain_port, keepalive=True, split_writes=True),
            ),
            Scenario(
                "Nagle on (TCP_NODELAY off)",
                "nagle",
                "POST as two writes (headers, body), one connection",
                nagle_round,
                _socket(plain_port, keepalive=True, nodelay=False, split_writes=True),
            ),
        ]
    if h2_port is not None:
        c = config.concurrency
        delayed = f"https://localhost:{h2_port}/?delay_ms={config.delay_ms}"
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        many = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        wait = f"{c} concurrent requests, the server waits {config.delay_ms} ms each"
        out += [
            Scenario(
                "h1 1 connection",
                "http2",
                f"HTTP/1.1 over one connection; {wait}",
                mux_round,
                _httpx(delayed, limits=one, verify=verify, concurrency=c),
                concurrency=c,
            ),
            Scenario(
                "h1 N connections",
                "http2",
                f"HTTP/1.1 over up to {c} connections; {wait}",
                mux_round,
                _httpx(delayed, limits=many, verify=verify, concurrency=c),
                concurrency=c,
            ),
            Scenario(
                "h2 1 connection",
                "http2",
                f"HTTP/2 over one connection, multiplexed; {wait}",
                mux_round,
                _httpx(delayed, limits=one, verify=verify, http1=False, http2=True, concurrency=c),
                concurrency=c,
            ),
        ]
    return out


async def _run_async(
    config: ExperimentConfig, work: Path, progress: Progress | None, report: NetworkReport
) -> None:
    cert = self_signed_certificate(work / "tls")
    verify = ssl.create_default_context(cafile=str(cert[0]))
    plain_port, tls_port, h2_port = _free_port(), _free_port(), _free_port()
    with_h2 = config.http2 and http2_available()
    if config.http2 and not with_h2:
        report.notes.append("HTTP/2 not measured: install hypercorn and h2 (the dev or lab extra)")
    with contextlib.ExitStack() as servers:
        servers.enter_context(_server(_uvicorn(plain_port), plain_port, work / "uvicorn-http.log"))
        servers.enter_context(_server(_uvicorn(tls_port, cert), tls_port, work / "uvicorn-https.log"))
        if with_h2:
            servers.enter_context(_server(_hypercorn(h2_port, cert), h2_port, work / "hypercorn.log"))
        scenarios = _scenarios(
            config,
            plain_port=plain_port,
            tls_port=tls_port,
            h2_port=h2_port if with_h2 else None,
            verify=verify,
            info=report.tls,
        )
        samples = {s.name: Sample() for s in scenarios}
        advances: dict[str, Advance] = {}
        for s in scenarios:
            if progress is None:
                advances[s.name] = _noop
            else:
                task_id: TaskID = progress.add_task(s.name, total=s.requests * config.rounds)
                advances[s.name] = partial(progress.advance, task_id)
        # Round-robin: a burst of load from elsewhere on the machine hits every scenario alike
        # instead of whichever happened to be running.
        for _ in range(config.rounds):
            for s in scenarios:
                samples[s.name].merge(await s.run(s.requests, advances[s.name]))
    report.scenarios = [s.result(samples[s.name]) for s in scenarios]


def run_experiment(config: ExperimentConfig, *, progress: Progress | None = None) -> NetworkReport:
    report = NetworkReport(
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        mode="closed-loop",
        host={
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "httpx": httpx.__version__,
            "loadavg_before": _load(),
        },
        tls={"certificate": "self-signed ECDSA P-256", "session_resumption": False},
        config=asdict(config),
    )
    with tempfile.TemporaryDirectory(prefix="mercato-lab-network-") as work:
        asyncio.run(_run_async(config, Path(work), progress, report))
    report.host["loadavg_after"] = _load()
    return report


# --- output -----------------------------------------------------------------------------------------------


def table(report: NetworkReport) -> Table:
    out = Table(
        title=f"mercato lab network ({report.mode}, loopback; TLS {report.tls.get('version')} "
        f"{report.tls.get('cipher')}; load {report.host['loadavg_before']} → "
        f"{report.host.get('loadavg_after')})"
    )
    for column in (
        "scenario",
        "proto",
        "reqs",
        "conc",
        "conns",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ms",
        "req/s",
    ):
        out.add_column(column, justify="left" if column in ("scenario", "proto") else "right")
    for s in report.scenarios:
        out.add_row(
            s.name,
            s.protocol or "—",
            str(s.requests),
            str(s.concurrency),
            str(s.connections) if s.connections else "—",
            f"{s.p50_ms:.3f}",
            f"{s.p90_ms:.3f}",
            f"{s.p99_ms:.3f}",
            f"{s.mean_ms:.3f}",
            f"{s.per_s:,.0f}",
        )
    return out


def plot(report: NetworkReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    panels = [
        (("httpx",), "httpx (Mercato's client): p50, whisker to p99", "latency, ms", False),
        (
            ("socket", "handshake"),
            "Raw sockets and handshakes alone: p50, whisker to p99",
            "latency, ms (log)",
            True,
        ),
        (("nagle",), "Nagle: POST as two small writes", "latency, ms (log)", True),
        (("http2",), "Concurrent requests to one server: req/s", "requests/s", False),
    ]
    colours = {"keep-alive": "tab:blue", "new connection": "tab:red", "alone": "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    for ax, (groups, title, ylabel, log) in zip(axes.flat, panels, strict=True):
        scenarios = [s for s in report.scenarios if s.group in groups]
        if not scenarios:
            ax.set_axis_off()
            ax.set_title(title + " (not measured)", fontsize=10)
            continue
        labels = [s.name.replace(" ", "\n", 1) for s in scenarios]
        colour = [next((c for k, c in colours.items() if k in s.name), "tab:purple") for s in scenarios]
        if groups == ("http2",):
            values = [s.per_s for s in scenarios]
            bars = ax.bar(labels, values, color=colour)
            ax.bar_label(bars, labels=[f"{v:,.0f}/s" for v in values], fontsize=8)
        else:
            values = [s.p50_ms for s in scenarios]
            errors = [[0.0] * len(scenarios), [s.p99_ms - s.p50_ms for s in scenarios]]
            bars = ax.bar(labels, values, yerr=errors, capsize=3, color=colour)
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8, label_type="center")
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    load = report.host["loadavg_before"]
    fig.suptitle(
        f"mercato lab network: loopback, {report.mode}, {report.host['cpus']} CPUs, "
        f"load average {load[0]:.2f} at start, {report.tls.get('version')} ({report.date})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _conclusions(report: NetworkReport) -> list[str]:
    c = report.claims()
    lines = []
    if c["new_tcp_connection_adds_ms"] is not None:
        lines.append(
            f"a new TCP connection per request adds {c['new_tcp_connection_adds_ms']} ms at p50 on raw "
            f"sockets ({c['socket_new_over_keepalive_p50']}x keep-alive), "
            f"{c['httpx_new_tcp_connection_adds_ms']} ms with httpx ({c['httpx_new_over_keepalive_p50']}x)"
        )
    if c["new_tls_connection_adds_ms"] is not None:
        lines.append(
            f"a new TLS connection (full handshake) adds {c['new_tls_connection_adds_ms']} ms at p50 on raw "
            f"sockets ({c['socket_tls_new_over_keepalive_p50']}x TLS keep-alive), "
            f"{c['httpx_new_tls_connection_adds_ms']} ms with httpx "
            f"({c['httpx_tls_new_over_keepalive_p50']}x)"
        )
    if c["tls_handshake_over_tcp_connect_p50"] is not None:
        lines.append(
            f"a TLS handshake alone costs {c['tls_handshake_over_tcp_connect_p50']}x a TCP connect()"
        )
    if c["h2_over_h1_one_connection_per_s"] is not None:
        lines.append(
            f"HTTP/2 over one connection: {c['h2_over_h1_one_connection_per_s']}x the req/s of HTTP/1.1 over "
            f"one connection, {c['h2_one_over_h1_n_connections_per_s']}x HTTP/1.1 over N connections"
        )
    if c["nagle_over_nodelay_p50"] is not None:
        lines.append(f"Nagle on, two small writes: p50 {c['nagle_over_nodelay_p50']}x TCP_NODELAY")
    return lines


def network_command(
    requests: Annotated[
        int, typer.Option(min=5, max=1_000_000, help="Requests per scenario, over all rounds")
    ] = 2000,
    rounds: Annotated[
        int, typer.Option(min=1, max=100, help="Scenarios run round-robin this many times (noise spread)")
    ] = 5,
    concurrency: Annotated[
        int, typer.Option(min=1, max=256, help="Concurrent requests (HTTP/2 scenarios)")
    ] = 16,
    delay_ms: Annotated[
        int, typer.Option(min=0, max=_MAX_DELAY_MS, help="Server wait per request (HTTP/2 scenarios)")
    ] = 5,
    http2: Annotated[
        bool, typer.Option("--http2/--no-http2", help="Measure HTTP/1.1 vs HTTP/2 (hypercorn)")
    ] = True,
    nagle: Annotated[bool, typer.Option("--nagle/--no-nagle", help="Measure TCP_NODELAY vs Nagle")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on stdout")] = False,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write the figure here (PNG)")] = None,
) -> None:
    """Handshakes vs keep-alive (TCP, TLS), HTTP/1.1 vs HTTP/2, Nagle: measured over loopback."""
    console = Console(stderr=True, width=160)
    if rounds > requests:
        console.print("[red]error:[/red] --rounds must not exceed --requests")
        raise typer.Exit(2)
    config = ExperimentConfig(
        requests=requests, rounds=rounds, concurrency=concurrency, delay_ms=delay_ms, http2=http2, nagle=nagle
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as progress:
        try:
            report = run_experiment(config, progress=progress)
        except (RuntimeError, OSError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    if plot_path is not None:
        plot(report, plot_path)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    console.print(table(report))
    for note in report.notes:
        console.print(f"[yellow]{note}[/yellow]")
    for line in _conclusions(report):
        console.print(f"• {line}")
    if plot_path is not None:
        console.print(f"Figure: {plot_path}")
