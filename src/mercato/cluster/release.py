"""Canary and blue/green releases over HAProxy's runtime API, gated on the processes' own metrics.

A *deployment* (`release.json` in a state folder) names the HAProxy runtime port and the groups of
servers behind its `api` backend (`stable` and `canary`, or `blue` and `green`), each member with its
HAProxy server name and base URL. Nothing here restarts anything: a release only moves weights.

Canary (`run_canary`): for each step (5, 20, 50, 100 %) the canary members get that weight and the
stable members the rest; then, every `check_every_s` during `interval_s`, each group's
`mercato_http_requests_total` and `mercato_http_request_duration_seconds` (summed over its members'
`/metrics`, probes excluded, counted from the step's start) are compared by `judge`:

    fail  if canary errors/requests > stable errors/requests + max_error_rate_delta
          or canary p99 > stable p99 x max_p99_ratio + p99_slack_s
             (errors once min_requests canary answers are seen; p99 once min_latency_requests are
             seen on both sides: the p99 of 30 answers is just their maximum)
    pass  at the end of the interval with min_requests seen and no failure

A step whose canary has not yet seen `min_requests` is extended (up to `max_extension` intervals).
A failure sets the canary's weight to 0 and the stable's back to 100 at once (the rollback) and writes
a release record with the reason; a step that still lacks canary traffic after its extension is
rolled back too (no evidence is no promotion; the record says so, `breach` false). At 100 % the
stable group gets no traffic: the canary is then compared with the stable group's last window that
had traffic.

Blue/green (`switch_blue_green`): every member of the target group must answer `/readyz` 200 and every
smoke path 200 (directly, not through HAProxy); then all weight moves to it in one runtime-API batch.
Switching back is the same call naming the other group. Records go to `releases.jsonl`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mercato.cluster.haproxy import HAProxy

__all__ = [
    "Deployment",
    "GroupSample",
    "Member",
    "ReleaseRecord",
    "Slo",
    "Window",
    "judge",
    "run_canary",
    "scrape_group",
    "set_group_weights",
    "switch_blue_green",
]

STATE_FILE = "release.json"
RECORDS_FILE = "releases.jsonl"
FULL_WEIGHT = 100


@dataclass(frozen=True)
class Member:
    name: str  # the server's name in HAProxy's `api` backend
    url: str  # its own base URL (for /metrics, /readyz and smoke checks)


@dataclass
class Deployment:
    runtime_port: int
    groups: dict[str, list[Member]]
    folder: Path
    live: str = "stable"

    @classmethod
    def load(cls, folder: Path) -> Deployment:
        data = json.loads((folder / STATE_FILE).read_text())
        groups = {g: [Member(**m) for m in members] for g, members in data["groups"].items()}
        return cls(int(data["runtime_port"]), groups, folder, data.get("live", "stable"))

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {
            "runtime_port": self.runtime_port,
            "groups": {g: [asdict(m) for m in ms] for g, ms in self.groups.items()},
            "live": self.live,
        }
        (self.folder / STATE_FILE).write_text(json.dumps(data, indent=2))

    def haproxy(self) -> HAProxy:
        """A handle on the running HAProxy's runtime API (it does not start one)."""
        return HAProxy(self.folder / "haproxy-handle", [], runtime_port=self.runtime_port)

    def record(self, record: ReleaseRecord) -> None:
        with (self.folder / RECORDS_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(record), default=str) + "\n")

    def records(self) -> list[dict[str, Any]]:
        path = self.folder / RECORDS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Slo:
    max_error_rate_delta: float = 0.01
    max_p99_ratio: float = 2.0
    p99_slack_s: float = 0.1
    min_requests: int = 30
    # A p99 of fewer answers is only their maximum: latency is judged from this many on each side.
    min_latency_requests: int = 100


@dataclass
class GroupSample:
    """Cumulative counters of one group at one moment (sums over its members)."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count

    def minus(self, earlier: GroupSample) -> Window:
        buckets = {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return Window(self.requests - earlier.requests, self.errors - earlier.errors, buckets)


@dataclass(frozen=True)
class Window:
    requests: float
    errors: float
    buckets: dict[float, float]

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_s(self) -> float:
        """The upper bound of the bucket holding the 99th percentile (Prometheus' resolution)."""
        total = self.buckets.get(math.inf, 0.0)
        if total <= 0:
            return 0.0
        for le in sorted(self.buckets):
            if self.buckets[le] >= 0.99 * total:
                return le if le != math.inf else max(k for k in self.buckets if k != math.inf)
        return 0.0


_PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/startupz", "/metrics"})


def parse_metrics(text: str, sample: GroupSample) -> None:
    """Add one process's request counters and latency buckets to `sample` (every route but the
    probes: HAProxy's health checks and our own scrapes are not the users' traffic)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("route", "") in _PROBE_ROUTES:
                continue
            if s.name == "mercato_http_requests_total":
                sample.requests += s.value
                if s.labels.get("status", "").startswith("5"):
                    sample.errors += s.value
            elif s.name == "mercato_http_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                sample.buckets[le] = sample.buckets.get(le, 0.0) + s.value


def scrape_group(members: Sequence[Member], *, timeout_s: float = 2.0) -> GroupSample:
    sample = GroupSample()
    for member in members:
        parse_metrics(httpx.get(f"{member.url}/metrics", timeout=timeout_s).text, sample)
    return sample


def judge(canary: Window, stable: Window, slo: Slo) -> tuple[str, str]:
    """("fail" | "pass" | "wait", reason); "pass" means nothing wrong seen yet with enough traffic."""
    if canary.requests < slo.min_requests:
        return "wait", f"{canary.requests:.0f} canary requests of {slo.min_requests} needed"
    if canary.error_rate > stable.error_rate + slo.max_error_rate_delta:
        return "fail", (
            f"canary error rate {canary.error_rate:.2%} > stable {stable.error_rate:.2%}"
            f" + {slo.max_error_rate_delta:.2%} ({canary.errors:.0f}/{canary.requests:.0f})"
        )
    limit = stable.p99_s * slo.max_p99_ratio + slo.p99_slack_s
    enough = min(canary.requests, stable.requests) >= slo.min_latency_requests
    if enough and canary.p99_s > limit:
        return "fail", f"canary p99 {canary.p99_s * 1000:.0f} ms > {limit * 1000:.0f} ms allowed"
    return "pass", (
        f"canary {canary.error_rate:.2%} errors, p99 {canary.p99_s * 1000:.0f} ms; "
        f"stable {stable.error_rate:.2%}, p99 {stable.p99_s * 1000:.0f} ms"
    )


@dataclass
class ReleaseRecord:
    id: str
    kind: str  # canary | blue-green
    started_at: str
    finished_at: str = ""
    outcome: str = ""  # promoted | rolled_back | switched | refused
    reason: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    detected_after_s: float | None = None  # from the failing step's start to the rollback
    breach: bool = False  # rolled back on an SLO breach (not for want of canary traffic)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def set_group_weights(haproxy: HAProxy, deployment: Deployment, weights: dict[str, int]) -> None:
    """Weights per group (every member of a group gets its group's weight)."""
    commands = []
    for group, weight in weights.items():
        for member in deployment.groups[group]:
            commands.append(f"set server api/{member.name} weight {int(weight)}")
    # One connection, commands separated by ';': HAProxy applies them back to back.
    answer = haproxy.command(";".join(commands))
    if any(word in answer.lower() for word in ("no such", "unknown", "invalid", "require")):
        raise RuntimeError(f"HAProxy refused {commands}: {answer.strip()}")


Event = Callable[[str, dict[str, Any]], None]


def run_canary(
    deployment: Deployment,
    *,
    steps: Sequence[int],
    interval_s: float,
    slo: Slo | None = None,
    stable: str = "stable",
    canary: str = "canary",
    check_every_s: float = 1.0,
    max_extension: float = 3.0,
    on_event: Event | None = None,
) -> ReleaseRecord:
    slo = slo or Slo()
    haproxy = deployment.haproxy()
    record = ReleaseRecord(id=uuid.uuid4().hex[:12], kind="canary", started_at=_now())
    emit = on_event or (lambda _kind, _data: None)
    last_stable: Window | None = None
    for weight in steps:
        set_group_weights(haproxy, deployment, {canary: weight, stable: FULL_WEIGHT - weight})
        emit("step", {"weight": weight, "t": time.monotonic()})
        step_start = time.monotonic()
        base_c, base_s = scrape_group(deployment.groups[canary]), scrape_group(deployment.groups[stable])
        verdict, reason = "wait", "no check yet"
        while True:
            time.sleep(check_every_s)
            win_c = scrape_group(deployment.groups[canary]).minus(base_c)
            win_s = scrape_group(deployment.groups[stable]).minus(base_s)
            if win_s.requests >= slo.min_requests or last_stable is None:
                last_stable = win_s
            verdict, reason = judge(win_c, last_stable, slo)
            emit("check", {"weight": weight, "verdict": verdict, "reason": reason})
            elapsed = time.monotonic() - step_start
            # Too little canary traffic to judge extends the step, up to `max_extension` intervals.
            if verdict == "fail" or elapsed >= interval_s * (1 if verdict == "pass" else max_extension):
                break
        record.steps.append({"weight": weight, "verdict": verdict, "reason": reason})
        if verdict != "pass":
            set_group_weights(haproxy, deployment, {canary: 0, stable: FULL_WEIGHT})
            record.detected_after_s = round(time.monotonic() - step_start, 3)
            record.outcome = "rolled_back"
            record.breach = verdict == "fail"
            record.reason = f"at {weight} %: {reason}" + (
                "" if record.breach else " (no evidence: not promoted)"
            )
            emit("rollback", {"weight": weight, "reason": reason, "t": time.monotonic()})
            break
    else:
        record.outcome = "promoted"
        record.reason = "every step within the SLO"
        deployment.live = canary
        deployment.save()
    record.finished_at = _now()
    deployment.record(record)
    return record


def _healthy(member: Member, smoke_paths: Sequence[str]) -> str | None:
    try:
        for path in ("/readyz", *smoke_paths):
            status = httpx.get(f"{member.url}{path}", timeout=3.0).status_code
            if status != 200:
                return f"{member.name} {path} answered {status}"
    except httpx.HTTPError as exc:
        return f"{member.name} unreachable: {exc.__class__.__name__}"
    return None


def switch_blue_green(
    deployment: Deployment, *, to: str, smoke_paths: Sequence[str] = ("/healthz", "/v1/products?limit=1")
) -> ReleaseRecord:
    """All traffic to group `to` once its readiness and smoke checks pass; else nothing moves."""
    record = ReleaseRecord(id=uuid.uuid4().hex[:12], kind="blue-green", started_at=_now())
    if to not in deployment.groups:
        raise ValueError(f"no group {to!r}; groups: {sorted(deployment.groups)}")
    problems = [p for m in deployment.groups[to] if (p := _healthy(m, smoke_paths)) is not None]
    if problems:
        record.outcome, record.reason = "refused", "; ".join(problems)
    else:
        weights = {group: (FULL_WEIGHT if group == to else 0) for group in deployment.groups}
        set_group_weights(deployment.haproxy(), deployment, weights)
        previous, deployment.live = deployment.live, to
        deployment.save()
        record.outcome, record.reason = "switched", f"{previous} -> {to}"
    record.finished_at = _now()
    deployment.record(record)
    return record
