"""`mercato lab leader`: leader election with fencing under a long pause and a lost etcd member.

The claim (guide §7, DDIA ch. 8): an election alone cannot stop two leaders from writing, because a
leader that pauses (a GC pause; here SIGSTOP) past its lease wakes up still believing it leads.
With fencing tokens checked by the database, the woken leader's writes are refused, so the
singleton job still ran exactly once per period; and the election, on a 3-member etcd, survives
the loss of one member.

The drill, on a private PostgreSQL and a 3-member etcd started here:

1. control: the job on `nodes` candidates *without* election, for a few periods: every node runs it;
2. `nodes` candidates (leader_node.py: the worker's election, runner and fencing) elect one leader;
3. the lab waits until the leader is inside its job's transaction (`pg_stat_activity`: "idle in
   transaction") and SIGSTOPs it for longer than the lease etcd granted;
4. another candidate is elected and claims a newer token; SIGCONT: the old leader's transaction
   reaches its COMMIT and is refused (`fenced`), and nothing with its old token commits after;
5. the etcd member the current leader talks to is stopped: the ticks go on.

Counted from the tick table (one row per applied pass) and the nodes' JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.bootstrap import SCRIPT_LOCATION
from mercato.cluster import PostgresNode, Topology
from mercato.cluster.etcd import start_etcd, stop_etcd, stop_etcd_member
from mercato.cluster.processes import spawn, stop
from mercato.kit.storage.migrations import upgrade
from mercato.lab.leader_node import TICKS_DDL

__all__ = ["LeaderConfig", "LeaderReport", "leader_command", "run_leader_lab"]

_console = Console(stderr=True)


@dataclass(frozen=True)
class LeaderConfig:
    nodes: int = 3
    period_s: float = 1.0
    work_s: float = 0.4
    ttl_s: int = 2
    control_periods: int = 4
    steady_periods: int = 4
    after_periods: int = 4
    out: Path = Path("lab-results/leader")


@dataclass
class LeaderReport:
    control_runs_per_period: float = 0.0
    control_duplicate_periods: int = 0
    granted_ttl_s: int = 0
    paused_holder: str = ""
    paused_token: int = 0
    pause_s: float = 0.0
    takeover_s: float | None = None
    new_holder: str = ""
    new_token: int = 0
    stale_fenced: int = 0
    stale_applied: int = 0
    duplicate_periods: int = 0
    periods_with_tick: int = 0
    periods_spanned: int = 0
    missed_outside_takeover: int = 0
    etcd_member_killed: str = ""
    ticks_after_member_kill: int = 0
    leaders_after_member_kill: list[str] = field(default_factory=list)
    ticks: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def held(self) -> bool:
        return (
            self.stale_applied == 0
            and self.stale_fenced >= 1
            and self.duplicate_periods == 0
            and self.takeover_s is not None
            and self.ticks_after_member_kill >= 2
            and self.missed_outside_takeover == 0
        )


class _Nodes:
    """The candidate processes: spawned by pid file, their JSON lines read back from their logs."""

    def __init__(self, folder: Path, db_url: str, etcd: str, config: LeaderConfig, name: str) -> None:
        self.folder = folder
        self.db_url = db_url
        self.etcd = etcd
        self.config = config
        self.name = name
        self.pids: dict[str, int] = {}

    def start(self, holder: str, *, endpoints: str) -> None:
        argv = [
            sys.executable, "-m", "mercato.lab.leader_node",
            "--db", self.db_url, "--etcd", endpoints, "--name", self.name, "--holder", holder,
            "--period", str(self.config.period_s), "--work", str(self.config.work_s),
            "--ttl", str(self.config.ttl_s),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
        self.pids[holder] = spawn(self.folder, holder, argv, env=env)

    def events(self, holder: str) -> list[dict[str, Any]]:
        path = self.folder / f"{holder}.log"
        out = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def stop_all(self) -> None:
        for holder, pid in self.pids.items():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                continue
            stop(self.folder, holder, timeout_s=5)


async def _ticks(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, period, holder, token, started_at,"
        " extract(epoch FROM committed_at)::float8 AS committed FROM lab_leader_ticks ORDER BY id"
    )
    return [dict(r) for r in rows]


async def _wait(predicate: Callable[[], Any], *, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval_s)
    return False


async def run_leader_lab(config: LeaderConfig, *, log: Callable[[str], None] = print) -> LeaderReport:
    report = LeaderReport()
    root = config.out / "cluster"
    topology = Topology.plan(root, members=3, scope="hel-leader")
    pg = PostgresNode.create()
    try:
        db_url = pg.create_database("hel_leader")
        await asyncio.to_thread(upgrade, SCRIPT_LOCATION, db_url)
        conn = await asyncpg.connect(pg.dsn("hel_leader"))
        await conn.execute(TICKS_DDL)
        log("starting a 3-member etcd")
        start_etcd(topology)
        try:
            await _control(config, conn, db_url, report, log)
            await _drill(config, conn, db_url, topology, report, log)
        finally:
            stop_etcd(topology)
            await conn.close()
    finally:
        pg.destroy()
    return report


async def _control(
    config: LeaderConfig,
    conn: asyncpg.Connection,
    db_url: str,
    report: LeaderReport,
    log: Callable[[str], None],
) -> None:
    log(f"control: {config.nodes} nodes without election")
    nodes = _Nodes(config.out / "control", db_url, "", config, "hel-control")
    for i in range(config.nodes):
        nodes.start(f"control{i}", endpoints="")
    try:
        await _wait(lambda: _count(conn), timeout_s=60, interval_s=0.2)  # the first tick: every node is up
        await asyncio.sleep(config.control_periods * config.period_s)
    finally:
        nodes.stop_all()
    ticks = await _ticks(conn)
    per_period: dict[int, int] = {}
    for t in ticks:
        per_period[t["period"]] = per_period.get(t["period"], 0) + 1
    full = [n for p, n in per_period.items() if p not in (min(per_period), max(per_period))]
    report.control_runs_per_period = round(sum(full) / len(full), 2) if full else 0.0
    report.control_duplicate_periods = sum(1 for n in per_period.values() if n > 1)
    await conn.execute("TRUNCATE lab_leader_ticks")


async def _count(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM lab_leader_ticks"))


async def _drill(
    config: LeaderConfig,
    conn: asyncpg.Connection,
    db_url: str,
    topology: Topology,
    report: LeaderReport,
    log: Callable[[str], None],
) -> None:
    endpoints = [f"127.0.0.1:{m.client_port}" for m in topology.etcd]
    name = f"hel-lab-{uuid.uuid4().hex[:8]}"
    nodes = _Nodes(config.out / "nodes", db_url, topology.etcd_endpoints, config, name)
    marks = report.marks
    t0 = time.time()
    before: set[int] = set()
    final: list[dict[str, Any]] = []
    try:
        for i in range(config.nodes):
            # Each candidate starts on a different member, as nodes on separate hosts would.
            rotated = endpoints[i % 3 :] + endpoints[: i % 3]
            nodes.start(f"node{i}", endpoints=",".join(rotated))
        if not await _wait(lambda: _count(conn), timeout_s=60, interval_s=0.2):
            raise RuntimeError(f"no leader ticked in 60 s; see {nodes.folder}/*.log")
        marks["first_tick"] = time.time() - t0
        await asyncio.sleep(config.steady_periods * config.period_s)
        leader = (await _ticks(conn))[-1]
        old, old_token = str(leader["holder"]), int(leader["token"])
        report.paused_holder, report.paused_token = old, old_token

        async def in_transaction() -> bool:
            state = await conn.fetchval(
                "SELECT state FROM pg_stat_activity WHERE application_name = $1"
                " AND state = 'idle in transaction' LIMIT 1",
                old,
            )
            return state is not None

        if not await _wait(in_transaction, timeout_s=10 * config.period_s, interval_s=0.01):
            raise RuntimeError("the leader was never seen inside its job's transaction")
        before = {int(t["id"]) for t in await _ticks(conn)}
        os.kill(nodes.pids[old], signal.SIGSTOP)
        stopped = time.time()
        marks["sigstop"] = stopped - t0
        log(f"SIGSTOP {old} (token {old_token}) inside its job's transaction")

        async def new_leader_ticked() -> bool:
            rows = await conn.fetch(
                "SELECT holder, token, started_at FROM lab_leader_ticks WHERE holder <> $1"
                " AND started_at > $2 ORDER BY id LIMIT 1",
                old,
                stopped,
            )
            if rows:
                report.new_holder, report.new_token = str(rows[0]["holder"]), int(rows[0]["token"])
                report.takeover_s = round(float(rows[0]["started_at"]) - stopped, 2)
            return bool(rows)

        if not await _wait(new_leader_ticked, timeout_s=60, interval_s=0.1):
            log("no new leader within 60 s")
        report.pause_s = round(time.time() - stopped, 2)
        granted = [e.get("granted") for e in nodes.events(report.new_holder) if e["event"] == "claimed"]
        report.granted_ttl_s = int(granted[-1]) if granted and granted[-1] else 0
        await asyncio.sleep(config.period_s)
        os.kill(nodes.pids[old], signal.SIGCONT)
        report.pause_s = round(time.time() - stopped, 2)
        marks["sigcont"] = time.time() - t0
        log(f"SIGCONT {old} after {report.pause_s} s")
        await asyncio.sleep(config.after_periods * config.period_s)
        fenced = [e for e in nodes.events(old) if e["event"] == "fenced"]
        report.stale_fenced = len(fenced)
        report.refused = [{"t": round(float(e["t"]) - t0, 3), "holder": old} for e in fenced]

        # An etcd member lost: the one the current leader started on.
        current = (await _ticks(conn))[-1]
        index = int(str(current["holder"]).removeprefix("node")) % 3
        member = topology.etcd[index]
        stop_etcd_member(topology, member)
        killed = time.time()
        marks["etcd_member_killed"] = killed - t0
        report.etcd_member_killed = member.name
        log(f"stopped etcd member {member.name}")
        await asyncio.sleep(config.after_periods * config.period_s + config.ttl_s)
        final = await _ticks(conn)  # before the teardown, whose resignations hand over again
        after = [t for t in final if t["started_at"] > killed]
        report.ticks_after_member_kill = len(after)
        report.leaders_after_member_kill = sorted({str(t["holder"]) for t in after})
    finally:
        nodes.stop_all()
    ticks = final
    # A stale write: a row of an older term that was not yet committed when its leader was paused
    # (its transaction was open then) and is there now.
    report.stale_applied = sum(
        1 for t in ticks if int(t["token"] or 0) < report.new_token and int(t["id"]) not in before
    )
    _judge(report, ticks, t0, config)


def _judge(report: LeaderReport, ticks: list[dict[str, Any]], t0: float, config: LeaderConfig) -> None:
    periods = [int(t["period"]) for t in ticks]
    report.duplicate_periods = len(periods) - len(set(periods))
    report.periods_with_tick = len(set(periods))
    report.periods_spanned = (max(periods) - min(periods) + 1) if periods else 0
    # Periods with no tick, other than those while the leader was paused and the new one campaigned:
    stop_at = t0 + report.marks.get("sigstop", 0.0)
    takeover_end = stop_at + (report.takeover_s or 0.0)
    gap = (
        {
            p
            for p in range(min(periods), max(periods) + 1)
            if p not in set(periods)
            and not (stop_at - config.period_s <= p * config.period_s <= takeover_end + config.period_s)
        }
        if periods
        else set()
    )
    report.missed_outside_takeover = len(gap)
    report.ticks = [
        {"t": round(float(t["started_at"]) - t0, 3), "holder": t["holder"], "token": t["token"]}
        for t in ticks
    ]


def report_table(report: LeaderReport) -> Table:
    table = Table(title="Leader election with fencing (3-member etcd, PostgreSQL)")
    for column in ("measure", "value", "goal"):
        table.add_column(column)
    rows = [
        (
            "control: runs per period without election",
            f"{report.control_runs_per_period}",
            "> 1 (each node runs it)",
        ),
        (
            "paused leader (SIGSTOP in its transaction)",
            f"{report.paused_holder} token {report.paused_token}",
            "",
        ),
        ("pause length", f"{report.pause_s} s", "> lease TTL"),
        ("lease TTL etcd granted", f"{report.granted_ttl_s} s", ""),
        ("takeover after SIGSTOP", f"{report.takeover_s} s", "≈ granted TTL"),
        ("new leader", f"{report.new_holder} token {report.new_token}", "larger token"),
        ("stale writes refused (fenced)", str(report.stale_fenced), "≥ 1"),
        ("stale writes applied", str(report.stale_applied), "0"),
        ("periods with two runs", str(report.duplicate_periods), "0"),
        ("periods missed outside the takeover", str(report.missed_outside_takeover), "0"),
        ("periods with a run / spanned", f"{report.periods_with_tick}/{report.periods_spanned}", ""),
        ("etcd member stopped", report.etcd_member_killed, ""),
        ("runs after the member stopped", str(report.ticks_after_member_kill), "≥ 2, one leader"),
        ("leaders after the member stopped", ", ".join(report.leaders_after_member_kill), ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def verdict(report: LeaderReport) -> list[str]:
    word = "held" if report.held else "did not hold"
    return [
        f"claim {word}: a leader paused {report.pause_s} s past its lease was replaced in "
        f"{report.takeover_s} s; on waking, {report.stale_fenced} write(s) refused, "
        f"{report.stale_applied} stale write(s) applied, {report.duplicate_periods} period(s) run twice "
        f"(without election: {report.control_runs_per_period} runs per period)",
        f"etcd member {report.etcd_member_killed} stopped: {report.ticks_after_member_kill} run(s) after, "
        f"by {', '.join(report.leaders_after_member_kill) or 'nobody'}",
    ]


def draw(report: LeaderReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    holders = sorted({str(t["holder"]) for t in report.ticks} | {str(r["holder"]) for r in report.refused})
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for t in report.ticks:
        ax.scatter(t["t"], holders.index(str(t["holder"])), s=18, color="tab:blue")
    for r in report.refused:
        ax.scatter(r["t"], holders.index(str(r["holder"])), s=60, color="tab:red", marker="x")
    for label, when in report.marks.items():
        if label != "first_tick":
            ax.axvline(when, color="tab:red", linestyle="--", linewidth=1)
            ax.text(when, 0.5, f" {label}", rotation=90, fontsize=7, va="center")
    ax.set_yticks(range(len(holders)), holders)
    ax.set_xlabel("seconds")
    ax.set_title(
        f"singleton job runs per holder (stale applied {report.stale_applied}, fenced {report.stale_fenced})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def leader_command(
    nodes: Annotated[int, typer.Option(min=2, max=5, help="Candidate processes")] = 3,
    period_s: Annotated[float, typer.Option(min=0.2, max=10, help="The job's period, s")] = 1.0,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """SIGSTOP the leader inside its job's transaction past its etcd lease, let another take over,
    SIGCONT it: its writes are refused; then stop an etcd member: the election goes on."""
    if update_docs:
        check_docs_target("leader")
    run = RunFolder.open("leader", out)
    config = LeaderConfig(nodes=nodes, period_s=period_s, work_s=period_s * 0.4, out=run.path)
    report = asyncio.run(run_leader_lab(config, log=_console.log))
    draw(report, run.figure)
    table = report_table(report)
    _console.print(table)
    lines = verdict(report)
    for line in lines:
        _console.print(line)
    run.record(
        data=asdict(report) | {"held": report.held, "config": {**asdict(config), "out": str(config.out)}},
        tables=[table],
        verdict=lines,
        update_docs=update_docs,
        console=_console,
    )
    if not report.held:
        raise typer.Exit(1)
