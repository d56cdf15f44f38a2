"""The scenarios of ``mercato lab network``: httpx and hand-written HTTP/1.1 clients on plain and TLS
connections, handshakes alone, Nagle vs TCP_NODELAY and HTTP/1.1 vs HTTP/2, each run closed-loop."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from mercato.lab.network_model import ExperimentConfig, ScenarioResult, scenario_result

Advance = Callable[[], None]


def noop() -> None:
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
        return scenario_result(
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
                advance=noop,
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


def build_scenarios(
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
