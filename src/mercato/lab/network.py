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

This module runs the experiment; the servers are in `network_servers`, the scenarios in
`network_scenarios`, the result types in `network_model`, the table and figure in `network_report`
and the command in `network_cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import ssl
import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path

import httpx
from rich.progress import Progress, TaskID

from mercato.kit.ports import free_port
from mercato.lab.network_model import ExperimentConfig, NetworkReport, ScenarioResult
from mercato.lab.network_report import plot
from mercato.lab.network_scenarios import Advance, Sample, build_scenarios, noop
from mercato.lab.network_servers import (
    http2_available,
    hypercorn_argv,
    lab_app,
    run_server,
    self_signed_certificate,
    uvicorn_argv,
)

__all__ = [
    "ExperimentConfig",
    "NetworkReport",
    "ScenarioResult",
    "http2_available",
    "lab_app",
    "plot",
    "run_experiment",
    "self_signed_certificate",
]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def _run_async(
    config: ExperimentConfig, work: Path, progress: Progress | None, report: NetworkReport
) -> None:
    cert = self_signed_certificate(work / "tls")
    verify = ssl.create_default_context(cafile=str(cert[0]))
    plain_port, tls_port, h2_port = free_port(), free_port(), free_port()
    with_h2 = config.http2 and http2_available()
    if config.http2 and not with_h2:
        report.notes.append("HTTP/2 not measured: install hypercorn and h2 (the dev or lab extra)")
    with contextlib.ExitStack() as servers:
        servers.enter_context(run_server(uvicorn_argv(plain_port), plain_port, work / "uvicorn-http.log"))
        servers.enter_context(run_server(uvicorn_argv(tls_port, cert), tls_port, work / "uvicorn-https.log"))
        if with_h2:
            servers.enter_context(run_server(hypercorn_argv(h2_port, cert), h2_port, work / "hypercorn.log"))
        scenarios = build_scenarios(
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
                advances[s.name] = noop
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
