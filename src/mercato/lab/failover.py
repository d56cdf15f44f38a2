"""`mercato lab failover`: the primary's PostgreSQL SIGKILLed under checkout load; Patroni promotes.

Hypothesis (guide §15, §38, Disaster Recovery checklist "failover drills"): on a 3-node Patroni
cluster in synchronous mode, with the failover timings of ADR 0031,
- a replica is promoted and the shop writes again within 15 s (RTO: from the first failed write of a
  probe that commits every 50 ms to its first successful write after it),
- no write that was acknowledged is missing afterwards (RPO 0: the probe's acknowledged rows are all
  on the new primary),
- every checkout driven through the API (`mercato lab chaos`'s driver, processes and invariants:
  every order terminal, no payment captured twice, stock conserved) still ends well: checkouts lost 0,
  double captures 0 — the shop's processes find the new primary by themselves (multi-host URL with
  `target_session_attrs=read-write`), nobody restarts them,
- the old primary comes back as a replica of the new timeline (pg_rewind), never as a second primary.

The run folder (`--out`, default `./lab-results/failover/<UTC time>/`, the shared harness) gets
`report.json`, `report.md` (the table) and `failover.png` (the probe's writes over time, the kill and
the promotion).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from mercato.cluster import Topology, cluster_down, cluster_status, cluster_up
from mercato.cluster.patroni import (
    FAILOVER_TIMINGS,
    node_dir,
    postmaster_pid,
    primary_node,
    restart_patroni_node,
)
from mercato.cluster.processes import make_traversable, read_pid
from mercato.cluster.topology import PostgresNode
from mercato.lab.chaos import ChaosConfig, ChaosReport, run_chaos
from mercato.lab.nats_failover import NatsFailoverResult, run_nats_failover

__all__ = ["FailoverConfig", "FailoverReport", "run_failover"]


@dataclass(frozen=True)
class FailoverConfig:
    checkouts: int = 60
    concurrency: int = 6
    drive_s: float = 25.0
    # The primary dies once this many checkouts have finished (the shop is up, sagas in flight).
    kill_after_checkouts: int = 10
    synchronous: bool = True
    probe_interval_s: float = 0.05
    rejoin_timeout_s: float = 90.0
    nats: bool = True
    nats_messages: int = 1500
    seed: int = 5
    out: Path | None = None
    # What dies on the primary: its PostgreSQL (postmaster) or its Patroni process only.
    kill: str = "postgres"
    # `kill="patroni"`: the supervisor (systemd) restarts Patroni this long after the kill.
    patroni_down_s: float = 20.0
    # `kill="patroni"`: the supervisor stops the orphaned PostgreSQL with its Patroni (systemd's
    # KillMode=control-group) instead of leaving it running (Patroni's unit file: KillMode=process).
    fence: bool = False


@dataclass
class FailoverReport:
    synchronous: bool
    old_primary: str = ""
    new_primary: str = ""
    timeline_before: int | None = None
    timeline_after: int | None = None
    rto_s: float | None = None
    probe_acked: int = 0
    probe_failed: int = 0
    rpo_missing: int = 0
    rejoined_as_replica: bool = False
    rejoin_s: float | None = None
    checkouts: dict[str, int] = field(default_factory=dict)
    invariants_ok: bool = False
    broken_invariants: list[str] = field(default_factory=list)
    violations: dict[str, int] = field(default_factory=dict)
    nats: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, int] = field(default_factory=lambda: dict(FAILOVER_TIMINGS))
    probe: list[tuple[float, bool]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    kill: str = "postgres"
    # kill=patroni: from the kill to a new leader (the leader key's ttl running out), and what a
    # write sent straight to the orphaned old primary got once the new one was promoted.
    new_leader_after_s: float | None = None
    orphan_write: str = ""
    orphan_write_acked: bool = False
    patroni_down_s: float = 0.0
    fence: bool = False
    # acknowledged probe commits missing afterwards: (seq, when, the node that acknowledged it)
    missing_acks: list[tuple[int, float, str]] = field(default_factory=list)
    process_logs: dict[str, str] = field(default_factory=dict)

    @property
    def rto_goal_s(self) -> float:
        # Patroni's death is noticed only when the leader key expires and fixed only when it runs
        # again (no watchdog here): the bound is the supervisor's restart delay plus a failover.
        return 15.0 if self.kill == "postgres" else self.patroni_down_s + 15.0

    @property
    def ok(self) -> bool:
        return (
            self.rto_s is not None
            and self.rto_s <= self.rto_goal_s
            and not self.orphan_write_acked
            and (self.rpo_missing == 0 or not self.synchronous)
            and self.invariants_ok
            and self.rejoined_as_replica
            and self.checkouts.get("client_status_500", 0) == 0
            and (not self.nats or self.nats.get("lost", 1) == 0)
        )


class _Probe:
    """Commits one numbered row every `interval_s` through the multi-host DSN; remembers which
    commits were acknowledged and when writes failed."""

    def __init__(self, dsn: str, interval_s: float, started: float) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.started = started
        self.acked: list[int] = []
        # seq -> (seconds since start, the server port that acknowledged it)
        self.acked_by: dict[int, tuple[float, int]] = {}
        self.samples: list[tuple[float, bool]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        conn: asyncpg.Connection | None = None
        seq = 0
        while not self.stop.is_set():
            seq += 1
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=1.0)
                port = await conn.fetchval(
                    "INSERT INTO lab_failover_probe (seq) VALUES ($1) RETURNING inet_server_port()",
                    seq,
                    timeout=2.0,
                )
            except Exception:  # noqa: BLE001 - any failure is a failed write; reconnect next time
                self.samples.append((time.monotonic() - self.started, False))
                if conn is not None:
                    conn.terminate()
                conn = None
            else:
                self.acked.append(seq)
                self.acked_by[seq] = (time.monotonic() - self.started, int(port))
                self.samples.append((time.monotonic() - self.started, True))
            await asyncio.sleep(self.interval_s)
        if conn is not None:
            await conn.close()

    def rto_s(self) -> float | None:
        first_fail = next((t for t, ok in self.samples if not ok), None)
        if first_fail is None:
            return 0.0
        return next((t - first_fail for t, ok in self.samples if ok and t > first_fail), None)


async def _admin(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn, timeout=5.0)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def _kill_primary(
    topology: Topology,
    under_load: asyncio.Event,
    report: FailoverReport,
    started: float,
    config: FailoverConfig,
) -> None:
    await asyncio.wait_for(under_load.wait(), timeout=180.0)
    primary = primary_node(topology)
    assert primary is not None, "no primary to kill"
    report.old_primary = primary.name
    if config.kill == "patroni":
        pid = read_pid(node_dir(topology, primary), "patroni")
        assert pid is not None, "primary's patroni.pid missing"
        os.kill(pid, signal.SIGKILL)  # Patroni alone: its PostgreSQL keeps running, orphaned
        report.events.append((time.monotonic() - started, f"SIGKILL Patroni of {primary.name}"))
        if config.fence:  # the supervisor takes the whole unit down: PostgreSQL dies with Patroni
            orphan = postmaster_pid(topology, primary)
            if orphan is not None:
                os.kill(orphan, signal.SIGKILL)
            report.events.append((time.monotonic() - started, "fenced: its postmaster SIGKILLed too"))
        await _orphaned_primary(topology, primary, report, started, config.patroni_down_s)
        return
    pid = postmaster_pid(topology, primary)
    assert pid is not None, "primary's postmaster.pid missing"
    os.kill(pid, signal.SIGKILL)
    report.events.append((time.monotonic() - started, f"SIGKILL postmaster of {primary.name}"))


async def _orphaned_primary(
    topology: Topology, old: PostgresNode, report: FailoverReport, started: float, down_s: float
) -> None:
    """Patroni of the primary is dead, its PostgreSQL is not. Wait for the leader key to expire and
    another node to take it; then send one write straight to the old primary (the split-brain
    question); at `down_s` after the kill restart Patroni as a supervisor would: it finds another
    leader and demotes its own PostgreSQL (pg_rewind, then it follows)."""
    killed = time.monotonic()
    while time.monotonic() - killed < down_s:
        leader = await asyncio.to_thread(primary_node, topology)
        if leader is not None and leader.name != old.name:
            report.new_leader_after_s = time.monotonic() - killed
            report.events.append((time.monotonic() - started, f"{leader.name} took the leader key"))
            report.orphan_write, report.orphan_write_acked = await _write_to(old)
            report.events.append((time.monotonic() - started, f"write to orphan: {report.orphan_write}"))
            break
        await asyncio.sleep(0.3)
    await asyncio.sleep(max(0.0, down_s - (time.monotonic() - killed)))
    await asyncio.to_thread(restart_patroni_node, topology, old)
    report.events.append((time.monotonic() - started, f"Patroni of {old.name} restarted"))


async def _write_to(node: PostgresNode, timeout_s: float = 3.0) -> tuple[str, bool]:
    """One INSERT straight to `node`'s port: was it acknowledged (a second primary), refused or left
    hanging (a commit waiting for a synchronous standby that no longer follows it)?"""
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=node.pg_port, user="postgres", database="postgres", timeout=timeout_s
        )
    except Exception as exc:  # noqa: BLE001 - down is an answer
        return f"connection refused ({type(exc).__name__})", False
    try:
        await conn.execute("INSERT INTO lab_failover_probe (seq) VALUES (-1)", timeout=timeout_s)
    except TimeoutError:
        return f"not acknowledged in {timeout_s:.0f} s (commit waits for its lost sync standby)", False
    except asyncpg.PostgresError as exc:
        return f"refused: {exc.sqlstate} {str(exc)[:80]}", False
    finally:
        conn.terminate()
    return "ACKNOWLEDGED: a second primary", True


async def _await_rejoin(topology: Topology, report: FailoverReport, started: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await asyncio.to_thread(cluster_status, topology)
        primary = state.primary
        old = next((n for n in state.nodes if n.name == report.old_primary), None)
        if primary is not None and primary.name != report.old_primary:
            if not report.new_primary:
                report.new_primary = primary.name
                report.events.append((time.monotonic() - started, f"{primary.name} is the leader"))
            report.timeline_after = primary.timeline
            if (
                old is not None
                and old.role in ("replica", "sync_standby")
                and old.state in ("running", "streaming")
                and old.timeline == primary.timeline
            ):
                report.rejoined_as_replica = True
                report.rejoin_s = time.monotonic() - started
                report.events.append((report.rejoin_s, f"{old.name} rejoined as {old.role}"))
                return
        await asyncio.sleep(0.5)


async def _drill(config: FailoverConfig, topology: Topology, report: FailoverReport) -> ChaosReport:
    dsn = topology.database_url(driver="postgresql")
    await _admin(
        dsn,
        "CREATE TABLE IF NOT EXISTS lab_failover_probe (seq int PRIMARY KEY, at timestamptz DEFAULT now())",
    )
    started = time.monotonic()
    probe = _Probe(dsn, config.probe_interval_s, started)
    chaos = ChaosConfig(
        checkouts=config.checkouts,
        kills=0,
        backend="postgresql",
        database_url=topology.database_url(),
        concurrency=config.concurrency,
        stock_per_sku=max(5, config.checkouts * 3 // 10),
        drive_s=config.drive_s,
        saga_deadline_s=60.0,
        # Only the database fails here: the providers answer (their faults are `lab chaos`'s subject).
        psp_error_rate=0.0,
        psp_hang_rate=0.0,
        psp_lost_response_rate=0.0,
        carrier_error_rate=0.0,
        seed=config.seed,
    )
    probe_task = asyncio.create_task(probe.run())
    under_load = asyncio.Event()
    done = 0

    def checkout_done() -> None:
        nonlocal done
        done += 1
        if done >= config.kill_after_checkouts:
            under_load.set()

    try:
        chaos_task = asyncio.create_task(run_chaos(chaos, on_checkout=checkout_done))
        # A checkout run that dies early (a process that never got ready) ends the wait too; its
        # error is raised below instead of a bare timeout three minutes later.
        chaos_task.add_done_callback(lambda _task: under_load.set())
        # Kill once the shop is up and checkouts flow: sagas are in flight at that moment.
        await _kill_primary(topology, under_load, report, started, config)
        await _await_rejoin(topology, report, started, config.rejoin_timeout_s)
        result = await chaos_task
    finally:
        probe.stop.set()
        await probe_task
    report.rto_s = probe.rto_s()
    report.probe = probe.samples
    report.probe_acked = len(probe.acked)
    report.probe_failed = sum(1 for _, ok in probe.samples if not ok)
    rows = await _admin(dsn, "SELECT seq FROM lab_failover_probe")
    present = {r["seq"] for r in rows}
    missing = [seq for seq in probe.acked if seq not in present]
    report.rpo_missing = len(missing)
    ports = {n.pg_port: n.name for n in topology.postgres}
    report.missing_acks = [
        (seq, round(probe.acked_by[seq][0], 2), ports.get(probe.acked_by[seq][1], "?")) for seq in missing
    ]
    return result


async def run_failover(config: FailoverConfig, *, log: Any = print) -> tuple[FailoverReport, Path]:
    out = config.out or Path("var/lab") / f"failover-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    out.mkdir(parents=True, exist_ok=True)
    # The cluster lives in a folder the PostgreSQL OS user can reach; the run folder keeps the report.
    root = Path(tempfile.mkdtemp(prefix="mercato-failover-"))
    make_traversable(root)
    report = FailoverReport(
        synchronous=config.synchronous,
        kill=config.kill,
        patroni_down_s=config.patroni_down_s,
        fence=config.fence,
    )
    try:
        log(f"starting the cluster in {root} (synchronous_mode={config.synchronous})")
        topology = await asyncio.to_thread(
            cluster_up, root / "cluster", synchronous_mode=config.synchronous, nats_cluster=config.nats
        )
        state = await asyncio.to_thread(cluster_status, topology)
        report.timeline_before = state.primary.timeline if state.primary else None
        log("cluster up; driving checkouts and killing the primary")
        chaos = await _drill(config, topology, report)
        report.checkouts = dict(chaos.counts)
        report.invariants_ok = chaos.ok
        report.broken_invariants = [v.name for v in chaos.verdicts if not v.ok]
        report.violations = {v.name: v.violations for v in chaos.verdicts}
        report.process_logs = {k: v[-3000:] for k, v in chaos.logs.items()}
        if config.nats:
            log("NATS: killing the stream leader under publish/consume")
            try:
                nats: NatsFailoverResult = await run_nats_failover(topology, messages=config.nats_messages)
            except Exception as exc:  # noqa: BLE001 - the PostgreSQL figures still get reported
                report.nats = {"error": repr(exc), "lost": -1}
            else:
                report.nats = {k: v for k, v in asdict(nats).items() if k != "timeline"}
    finally:
        await asyncio.to_thread(cluster_down, root / "cluster", purge=True)
    (out / "report.json").write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2, default=str))
    (out / "report.md").write_text(report_table(report))
    plot(report, out / "failover.png")
    return report, out


def report_rows(report: FailoverReport) -> list[tuple[str, str, str]]:
    c = report.checkouts
    v = report.violations
    mode = "0" if report.synchronous else "measured"
    promoted = (
        f"{report.old_primary} → {report.new_primary}, {report.timeline_before} → {report.timeline_after}"
    )
    rejoined = f"{report.rejoined_as_replica} at {_fmt(report.rejoin_s, 's')}"
    invariants = "hold" if report.invariants_ok else f"BROKEN {report.broken_invariants}"
    rows = [
        ("what was SIGKILLed on the primary", report.kill, ""),
        (
            "RTO (first failed write → first successful write)",
            _fmt(report.rto_s, "s"),
            f"≤ {report.rto_goal_s:.0f} s",
        ),
        ("RPO (acknowledged probe commits missing)", str(report.rpo_missing), mode),
        ("probe commits acknowledged / failed", f"{report.probe_acked} / {report.probe_failed}", ""),
        ("old → new primary, timeline", promoted, "promoted"),
        ("old primary rejoined as replica (pg_rewind)", rejoined, "yes"),
        ("checkouts driven", str(c.get("checkouts_driven", 0)), ""),
        ("checkouts lost (not in one terminal state)", str(v.get("terminal_state", -1)), "0"),
        ("double captures (PSP ledger)", str(v.get("single_capture", -1)), "0"),
        ("stock conservation violations", str(v.get("stock_conserved", -1)), "0"),
        ("API 500s seen by clients", str(c.get("client_status_500", 0)), "0"),
        ("API 503s seen by clients (retried)", str(c.get("client_status_503", 0)), "any"),
        ("shop invariants (lab chaos checks)", invariants, "hold"),
        ("NATS: acked / consumed / lost, pause", _nats(report.nats), "lost 0"),
    ]
    if report.kill == "patroni":
        rows[1:1] = [
            ("kill → another node holds the leader key", _fmt(report.new_leader_after_s, "s"), "≈ ttl"),
            ("a write straight to the orphaned old primary", report.orphan_write or "-", "not acknowledged"),
            ("Patroni restarted by the supervisor after", f"{report.patroni_down_s:.0f} s", ""),
            ("orphaned PostgreSQL fenced with Patroni", "yes" if report.fence else "no", ""),
            ("missing acknowledged commits (seq, t, acked by)", str(report.missing_acks[:5]), "none"),
        ]
    return rows


def _nats(n: dict[str, Any]) -> str:
    if not n:
        return "not run"
    if "error" in n:
        return f"error: {n['error']}"
    return f"{n['acked']} / {n['consumed']} / {n['lost']}, {n['pause_s']:.2f} s (killed {n['killed']})"


def _fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def report_table(report: FailoverReport) -> str:
    lines = [
        f"# Failover drill: {report.kill} SIGKILLed "
        f"({'synchronous' if report.synchronous else 'asynchronous'} replication)",
        "",
        f"Patroni timings: {report.timings}. Verdict: {'PASS' if report.ok else 'FAIL'}.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in report_rows(report)]
    return "\n".join(lines) + "\n"


def plot(report: FailoverReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    ok = [t for t, good in report.probe if good]
    bad = [t for t, good in report.probe if not good]
    ax.scatter(ok, [1] * len(ok), s=4, color="tab:green", label="write committed")
    ax.scatter(bad, [0] * len(bad), s=4, color="tab:red", label="write failed")
    for t, what in report.events:
        ax.axvline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.text(t, 0.5, what, rotation=90, fontsize=7, va="center")
    ax.set_yticks([0, 1], ["failed", "ok"])
    ax.set_xlabel("seconds since the drill started")
    ax.set_title(f"Patroni failover: RTO {_fmt(report.rto_s, 's')}, RPO {report.rpo_missing} rows")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
