"""What ``mercato lab network`` measures and reports: one result per scenario, the whole run's report with
the comparisons its hypotheses are about, and the run's configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def scenario_result(
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
        p50_ms=round(percentile(ordered, 0.50), 4),
        p90_ms=round(percentile(ordered, 0.90), 4),
        p99_ms=round(percentile(ordered, 0.99), 4),
        max_ms=round(ordered[-1], 4) if ordered else 0.0,
        protocol=protocol,
    )


@dataclass(frozen=True)
class ExperimentConfig:
    requests: int = 2000  # per scenario, over all rounds
    rounds: int = 5
    concurrency: int = 16
    delay_ms: int = 5
    http2: bool = True
    nagle: bool = True
