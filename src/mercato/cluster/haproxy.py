"""HAProxy in front of N HTTP backends (the shop's `mercato api` processes): configuration generated
here, the process started in a folder on free loopback ports, and driven through its runtime API.

- Health checks: `GET /readyz` every `check_interval_ms`; `fall` failures mark a server DOWN, `rise`
  successes bring it back. An API process answering 503 on SIGTERM is taken out of rotation before
  it stops accepting connections (graceful drain, ADR 0040).
- Slow start: a server coming back UP gets its weight ramped from ~0 to full over `slowstart_s`
  (for weight-based algorithms; HAProxy also ramps its connection limit).
- Runtime API (`stats socket` on a loopback TCP port, admin level): set a server's weight, drain it
  (no new requests, in-flight ones finish), put it in maintenance or back to ready, add/delete
  servers without a reload, read `show stat` (state, weight, current/total sessions, 5xx, check
  status) per server.
- Prometheus: HAProxy's own exporter on `stats_port` at `/metrics`, with its HTML stats page at `/stats`.

Nothing here imports the shop. We never write a balancer of our own for the HTTP edge: HAProxy is
the proven one (guide §30); `kit/balancing` is only for client-side calls to providers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from mercato.cluster.processes import alive, read_pid, spawn, stop, wait_until
from mercato.kit.ports import free_port

__all__ = [
    "BALANCE_ALGORITHMS",
    "Backend",
    "HAProxy",
    "HAProxyError",
    "HAProxySettings",
    "ServerStats",
    "haproxy_binary",
    "render_config",
]

HAPROXY_BIN = "haproxy"
BACKEND_NAME = "api"
FRONTEND_NAME = "edge"
PROCESS_NAME = "haproxy"
# HAProxy's names for the algorithms the balancing lab compares (guide §30): `random(2)` is the
# power of two random choices, picking the one with fewer outstanding requests.
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "random(2)")


class HAProxyError(RuntimeError):
    """HAProxy would not start, or its runtime API refused a command."""


@dataclass(frozen=True)
class Backend:
    """One server behind HAProxy. `name` is its name in the `api` backend (letters, digits, `_-.`)."""

    name: str
    host: str
    port: int
    weight: int = 100

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HAProxySettings:
    """Everything the generated configuration depends on; the defaults suit a local cluster."""

    balance: str = "roundrobin"
    health_path: str = "/readyz"
    check_interval_ms: int = 500
    fall: int = 2
    rise: int = 2
    slowstart_s: int = 5
    # `conn-failure` retries a request only when no byte of it reached a server (safe for a POST);
    # `redispatch` sends the retry to another server.
    retries: int = 3
    timeout_connect_ms: int = 2_000
    timeout_client_ms: int = 60_000
    timeout_server_ms: int = 60_000
    timeout_queue_ms: int = 10_000
    # Per-server cap on concurrent requests; excess waits in HAProxy's queue (0 = no cap).
    maxconn_per_server: int = 0
    maxconn: int = 4_096
    threads: int = 1
    # Close the server-side connection after each response (no keep-alive to backends).
    server_close: bool = False
    extra_backend_lines: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not (
            self.balance in BALANCE_ALGORITHMS or self.balance.startswith(("random", "static-rr", "first"))
        ):
            raise ValueError(f"unknown balance algorithm {self.balance!r}; one of {BALANCE_ALGORITHMS}")


@dataclass(frozen=True)
class ServerStats:
    """One server's line of `show stat`."""

    name: str
    status: str  # UP, DOWN, MAINT, DRAIN, "UP 1/2" while rising, "NOLB"...
    weight: int
    current_sessions: int  # scur: requests in flight (HTTP mode: one per active request)
    total_sessions: int  # stot: requests sent to it since start
    queued: int  # qcur
    responses_5xx: int
    connection_errors: int  # econ
    response_errors: int  # eresp
    retries: int  # wretr
    redispatches: int  # wredis
    check_status: str
    last_change_s: int  # seconds since the last UP/DOWN transition
    downtime_s: int

    @property
    def up(self) -> bool:
        return self.status.startswith("UP") or self.status == "DRAIN"


def haproxy_binary() -> str:
    """HAProxy's path (Debian puts it in /usr/sbin, not always on a user's PATH)."""
    binary = shutil.which(HAPROXY_BIN) or shutil.which(HAPROXY_BIN, path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        raise HAProxyError("haproxy not found: apt-get install haproxy")
    return binary


def server_options(backend: Backend, settings: HAProxySettings) -> list[str]:
    """A server's health-check, weight, slow-start and connection-limit keywords."""
    options = [
        "check",
        f"inter {settings.check_interval_ms}ms",
        f"fall {settings.fall}",
        f"rise {settings.rise}",
        f"weight {backend.weight}",
    ]
    if settings.slowstart_s > 0:
        options.append(f"slowstart {settings.slowstart_s}s")
    if settings.maxconn_per_server > 0:
        options.append(f"maxconn {settings.maxconn_per_server}")
    return options


def server_line(backend: Backend, settings: HAProxySettings) -> str:
    return " ".join([f"server {backend.name} {backend.address}", *server_options(backend, settings)])


def render_config(
    backends: Sequence[Backend],
    settings: HAProxySettings,
    *,
    port: int,
    stats_port: int,
    runtime_port: int,
    host: str = "127.0.0.1",
) -> str:
    """The whole haproxy.cfg: one HTTP frontend on `host:port`, the `api` backend, a stats/metrics
    listener on `stats_port` and the admin runtime API on `runtime_port` (loopback TCP)."""
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ValueError(f"backend names must be unique: {names}")
    lines = [
        "global",
        f"    maxconn {settings.maxconn}",
        f"    nbthread {settings.threads}",
        f"    stats socket ipv4@127.0.0.1:{runtime_port} level admin expose-fd listeners",
        "    stats timeout 30s",
        "    log stdout format raw local0 notice",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        "    option redispatch",
        f"    retries {settings.retries}",
        "    retry-on conn-failure",
        f"    timeout connect {settings.timeout_connect_ms}ms",
        f"    timeout client {settings.timeout_client_ms}ms",
        f"    timeout server {settings.timeout_server_ms}ms",
        f"    timeout queue {settings.timeout_queue_ms}ms",
        "    timeout http-keep-alive 10s",
        "    timeout check 2s",
        "",
        f"frontend {FRONTEND_NAME}",
        f"    bind {host}:{port}",
        "    option forwardfor",
        f"    default_backend {BACKEND_NAME}",
        "",
        f"backend {BACKEND_NAME}",
        f"    balance {settings.balance}",
        f"    option httpchk GET {settings.health_path}",
        "    http-check expect status 200",
        "    default-server init-addr none",
    ]
    if settings.server_close:
        lines.append("    option http-server-close")
    lines.extend(f"    {line}" for line in settings.extra_backend_lines)
    lines.extend(f"    {server_line(b, settings)}" for b in backends)
    lines += [
        "",
        "frontend stats",
        f"    bind 127.0.0.1:{stats_port}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 2s",
        "",
    ]
    return "\n".join(lines)


class HAProxy:
    """One HAProxy process owning `folder` (haproxy.cfg, haproxy.log, haproxy.pid).

    Ports are picked free at construction (or given). `start()` validates the config (`haproxy -c`),
    spawns HAProxy in the foreground in its own session and waits until its frontend and runtime API
    answer; `stop()` terminates it. Use as a context manager in tests."""

    def __init__(
        self,
        folder: Path,
        backends: Sequence[Backend],
        settings: HAProxySettings | None = None,
        *,
        port: int | None = None,
        stats_port: int | None = None,
        runtime_port: int | None = None,
    ) -> None:
        self.folder = folder.resolve()
        self.backends: list[Backend] = list(backends)
        self.settings = settings or HAProxySettings()
        taken: set[int] = set()
        self.port = port or free_port(taken=taken)
        self.stats_port = stats_port or free_port(taken=taken)
        self.runtime_port = runtime_port or free_port(taken=taken)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.folder / "haproxy.cfg"

    @property
    def pid(self) -> int | None:
        return read_pid(self.folder, PROCESS_NAME)

    @property
    def running(self) -> bool:
        return alive(self.pid)

    def write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = render_config(
            self.backends,
            self.settings,
            port=self.port,
            stats_port=self.stats_port,
            runtime_port=self.runtime_port,
        )
        self.config_path.write_text(text)
        check = subprocess.run(  # noqa: S603 - our argv
            [haproxy_binary(), "-c", "-q", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if check.returncode != 0:
            raise HAProxyError(f"invalid haproxy.cfg ({self.config_path}): {check.stderr.strip()}")
        return self.config_path

    def start(self, *, timeout_s: float = 15.0, wait_healthy: int | None = None) -> HAProxy:
        """Start HAProxy; with `wait_healthy=n`, also wait until n servers are UP."""
        if self.running:
            return self
        self.write_config()
        spawn(self.folder, PROCESS_NAME, [haproxy_binary(), "-db", "-f", str(self.config_path)])
        if not wait_until(self._answers, timeout_s=timeout_s, interval_s=0.1):
            self.stop()
            raise HAProxyError(f"haproxy did not start in {timeout_s:.0f} s; see {self.folder}/haproxy.log")
        if wait_healthy is not None:
            self.wait_up(wait_healthy, timeout_s=timeout_s)
        return self

    def stop(self, *, graceful: bool = False, timeout_s: float = 10.0) -> bool:
        """Stop HAProxy. `graceful`: SIGUSR1 (soft stop: listeners close, in-flight requests
        finish) before the SIGTERM; True if it was running."""
        pid = self.pid
        if graceful and alive(pid):
            assert pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
            wait_until(lambda: not alive(pid), timeout_s=timeout_s)
        return stop(self.folder, PROCESS_NAME, timeout_s=timeout_s)

    def reload(self, *, timeout_s: float = 15.0) -> None:
        """Apply `self.backends` / `self.settings` by restarting HAProxy (state set through the
        runtime API is lost). Prefer `add_server` / `del_server` for membership changes."""
        self.stop()
        self.start(timeout_s=timeout_s)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _answers(self) -> bool:
        if not self.running:
            raise HAProxyError("haproxy exited")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            pass
        return bool(self.command("show info"))

    # -- runtime API ------------------------------------------------------------------------------

    def command(self, line: str, *, timeout_s: float = 5.0) -> str:
        """Send one runtime-API command and return HAProxy's answer (text)."""
        with socket.create_connection(("127.0.0.1", self.runtime_port), timeout=timeout_s) as sock:
            sock.sendall(line.encode() + b"\n")
            chunks: list[bytes] = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def _server_command(self, line: str) -> str:
        answer = self.command(line).strip()
        lowered = answer.lower()
        if any(word in lowered for word in ("no such", "unknown", "require", "invalid", "error", "not ")):
            raise HAProxyError(f"{line!r}: {answer}")
        return answer

    def set_weight(self, server: str, weight: int) -> None:
        """Set a server's weight (0..256); 0 takes it out of the balancing without marking it down."""
        self._server_command(f"set server {BACKEND_NAME}/{server} weight {int(weight)}")

    def drain(self, server: str) -> None:
        """No new requests to `server`; those in flight finish (state DRAIN)."""
        self._server_command(f"set server {BACKEND_NAME}/{server} state drain")

    def disable(self, server: str) -> None:
        """Maintenance: out of rotation and its health checks paused (state MAINT)."""
        self._server_command(f"set server {BACKEND_NAME}/{server} state maint")

    def enable(self, server: str) -> None:
        """Back to READY (then UP once its health checks pass)."""
        self._server_command(f"set server {BACKEND_NAME}/{server} state ready")

    def add_server(self, backend: Backend) -> None:
        """Add a server at run time (HAProxy ≥ 2.4 dynamic servers), health-checked, with slow start."""
        options = " ".join(server_options(backend, self.settings))
        answer = self.command(f"add server {BACKEND_NAME}/{backend.name} {backend.address} {options}")
        if "New server registered" not in answer:
            raise HAProxyError(f"add server {backend.name}: {answer.strip()}")
        self._server_command(f"enable health {BACKEND_NAME}/{backend.name}")
        self.enable(backend.name)
        self.backends.append(backend)

    def del_server(self, server: str) -> None:
        """Remove a server at run time: put it in maintenance, wait for its requests, delete it."""
        self.disable(server)
        wait_until(lambda: self.server(server).current_sessions == 0, timeout_s=30.0, interval_s=0.1)
        answer = self.command(f"del server {BACKEND_NAME}/{server}")
        if "Server deleted" not in answer:
            raise HAProxyError(f"del server {server}: {answer.strip()}")
        self.backends = [b for b in self.backends if b.name != server]

    def stats(self) -> list[ServerStats]:
        """Every server of the `api` backend, from `show stat`."""
        text = self.command("show stat").lstrip("# ")
        out: list[ServerStats] = []
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") != BACKEND_NAME or row.get("svname") in ("BACKEND", "FRONTEND"):
                continue
            out.append(
                ServerStats(
                    name=row["svname"],
                    status=row.get("status", ""),
                    weight=_int(row.get("weight")),
                    current_sessions=_int(row.get("scur")),
                    total_sessions=_int(row.get("stot")),
                    queued=_int(row.get("qcur")),
                    responses_5xx=_int(row.get("hrsp_5xx")),
                    connection_errors=_int(row.get("econ")),
                    response_errors=_int(row.get("eresp")),
                    retries=_int(row.get("wretr")),
                    redispatches=_int(row.get("wredis")),
                    check_status=row.get("check_status", ""),
                    last_change_s=_int(row.get("lastchg")),
                    downtime_s=_int(row.get("downtime")),
                )
            )
        return out

    def server(self, name: str) -> ServerStats:
        for s in self.stats():
            if s.name == name:
                return s
        raise HAProxyError(f"no server {name!r} in backend {BACKEND_NAME}")

    def request_counts(self) -> dict[str, int]:
        """Requests sent to each server since HAProxy started (`stot`)."""
        return {s.name: s.total_sessions for s in self.stats()}

    def up_servers(self) -> list[str]:
        return [s.name for s in self.stats() if s.status.startswith("UP")]

    def wait_up(self, count: int | None = None, *, timeout_s: float = 30.0) -> None:
        """Wait until `count` servers (default: all) are UP (slow start may still be ramping)."""
        want = len(self.backends) if count is None else count
        if not wait_until(lambda: len(self.up_servers()) >= want, timeout_s=timeout_s, interval_s=0.1):
            raise HAProxyError(f"{want} servers not UP in {timeout_s:.0f} s: {self.stats()}")

    def wait_status(self, server: str, prefix: str, *, timeout_s: float = 30.0) -> None:
        """Wait until `server`'s status starts with `prefix` (e.g. "DOWN", "UP", "MAINT")."""
        if not wait_until(
            lambda: self.server(server).status.startswith(prefix), timeout_s=timeout_s, interval_s=0.1
        ):
            raise HAProxyError(f"{server} not {prefix} in {timeout_s:.0f} s: {self.server(server)}")

    def metrics(self) -> str:
        """HAProxy's own Prometheus exposition (per-server counters, check states)."""
        return httpx.get(f"http://127.0.0.1:{self.stats_port}/metrics", timeout=5.0).text

    def with_settings(self, **changes: object) -> HAProxySettings:
        """A copy of the settings with `changes` (then `reload()` to apply)."""
        self.settings = replace(self.settings, **changes)  # type: ignore[arg-type]
        return self.settings


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0
