"""`mercato lab network` on a tiny run: real servers, real connections counted by the server."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mercato.lab.cli import app as lab_app
from mercato.lab.network import ExperimentConfig, http2_available, plot, run_experiment

REQUESTS = 12


def test_a_tiny_run_uses_the_connections_each_scenario_claims(tmp_path: Path) -> None:
    report = run_experiment(ExperimentConfig(requests=REQUESTS, rounds=2, concurrency=4, delay_ms=2))
    by_name = {s.name: s for s in report.scenarios}
    # Keep-alive means one connection per round (a fresh client each round) for all its requests; "new
    # connection" one per request. The server, not the client, says which connection it was.
    for client in ("httpx", "socket"):
        assert by_name[f"{client} keep-alive"].connections == 2
        assert by_name[f"{client} TLS keep-alive"].connections == 2
        assert by_name[f"{client} new connection"].connections == REQUESTS
        assert by_name[f"{client} TLS new connection"].connections == REQUESTS
    assert all(s.requests > 0 and s.p50_ms > 0 for s in report.scenarios)
    assert report.tls["version"] in {"TLSv1.2", "TLSv1.3"}
    # A full TLS handshake is cryptography plus two flights; a loopback connect() is one system call.
    assert by_name["TLS handshake alone"].p50_ms > by_name["TCP connect alone"].p50_ms
    assert {"TCP_NODELAY on", "Nagle on (TCP_NODELAY off)"} <= by_name.keys()
    if http2_available():
        assert by_name["h2 1 connection"].protocol == "HTTP/2"
        assert by_name["h2 1 connection"].connections == 2
        assert by_name["h1 1 connection"].protocol == "HTTP/1.1"
        assert by_name["h1 1 connection"].connections == 2
    figure = tmp_path / "network.png"
    plot(report, figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    claims = report.to_json()["claims"]
    assert claims["socket_new_over_keepalive_p50"] is not None
    assert claims["new_tls_connection_adds_ms"] is not None


def test_the_command_prints_json_and_writes_its_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "out"
    result = CliRunner().invoke(
        lab_app,
        [
            "network",
            "--requests",
            "6",
            "--rounds",
            "2",
            "--no-http2",
            "--no-nagle",
            "--json",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"] == "closed-loop"
    assert {s["name"] for s in data["scenarios"]} == {
        "httpx keep-alive",
        "httpx new connection",
        "httpx TLS keep-alive",
        "httpx TLS new connection",
        "socket keep-alive",
        "socket new connection",
        "socket TLS keep-alive",
        "socket TLS new connection",
        "TCP connect alone",
        "TLS handshake alone",
    }
    assert all(s["requests"] == 6 for s in data["scenarios"])
    assert (run / "network.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "report.json").read_text())["scenarios"] == data["scenarios"]
    assert "socket keep-alive" in (run / "table.txt").read_text()
    assert "TLS" in (run / "verdict.txt").read_text()


def test_bad_options_are_refused_with_a_usage_error() -> None:
    assert CliRunner().invoke(lab_app, ["network", "--requests", "0"]).exit_code == 2
    assert CliRunner().invoke(lab_app, ["network", "--requests", "5", "--rounds", "6"]).exit_code == 2
