"""Where `bench scale`'s CPU goes, per request: what `mercato capacity plan`'s model is built from.

Around every step the probe reads the CPU counters of each part of the set-up that serves or makes
the load (ADR 0057):

- the API processes (their process trees), HAProxy (its pid), the PostgreSQL backends serving the
  run's database (pids from pg_stat_activity: the shared server's other databases are not ours),
  the load generator (its own `process_time`, already in the step);
- the whole machine (/proc/stat): what it spent beyond those parts during the step is the *foreign*
  load (other users of the box, and the little kernel time no process is billed for: softirq ticks
  land in the interrupted process's system time, so the loopback traffic is mostly in the parts).

Each CPU figure is divided by the requests the step finished, so a plan reads CPU seconds per
request, not rates that depend on how busy the machine was. A quiet window before each step (the
fleet idle) also records the machine's busy cores then: how much the others *would* take of an idle
machine (CPU-hungry neighbours fill it), which over-states what they take while we compete for the
cores (the scheduler shares them), so the model uses the foreign load measured during the step.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg

from mercato.bench.runner import Bench, Target
from mercato.bench.servers import ServerProcess, machine_busy_s, process_tree_cpu_s
from mercato.bench.stats import StepResult
from mercato.cluster.fleet import ApiFleet
from mercato.cluster.processes import read_pid

__all__ = ["CostProbe", "ProbedBench", "pid_cpu_s"]

PARTS = ("api", "postgres", "haproxy", "generator")
QUIET_WINDOW_S = 0.6  # long enough for a few clock ticks on each core, short beside a step


def pid_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (no children), None if it is gone."""
    return process_tree_cpu_s(pid) if Path(f"/proc/{pid}").exists() else None


class CostProbe:
    """CPU counters of the parts of one fleet run: API processes, HAProxy, the database's backends."""

    def __init__(self, fleet: ApiFleet, database_url: str) -> None:
        self.fleet = fleet
        self.dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.database = database_url.rsplit("/", 1)[1].split("?", 1)[0]
        self._conn: asyncpg.Connection | None = None

    async def _backend_pids(self) -> list[int]:
        if self._conn is None:
            self._conn = await asyncpg.connect(self.dsn)
        rows = await self._conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.database,
        )
        return [int(r["pid"]) for r in rows]

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def api_s(self) -> float:
        total = 0.0
        for instance in self.fleet.instances:
            pid = read_pid(self.fleet.folder, instance.name)
            total += (process_tree_cpu_s(pid) if pid else None) or 0.0
        return total

    def haproxy_s(self) -> float:
        pid = self.fleet.haproxy.pid
        return (pid_cpu_s(pid) if pid else None) or 0.0

    async def snapshot(self) -> dict[str, Any]:
        pids = await self._backend_pids()
        backends = {pid: pid_cpu_s(pid) or 0.0 for pid in pids}
        return {
            "t": time.monotonic(),
            "machine": machine_busy_s(),
            "api": self.api_s(),
            "haproxy": self.haproxy_s(),
            "postgres": backends,
        }

    @staticmethod
    def cpu_s(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        """CPU seconds between two snapshots, per part (a backend seen only at the end counts from 0),
        and the wall seconds between them."""
        pg = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in after["postgres"].items())
        return {
            "wall": max(1e-6, after["t"] - before["t"]),
            "machine": after["machine"] - before["machine"],
            "api": after["api"] - before["api"],
            "haproxy": after["haproxy"] - before["haproxy"],
            "postgres": max(0.0, pg),
        }


class ProbedBench(Bench):
    """`Bench` whose steps also record the cost breakdown (kept beside the step, by its identity)."""

    def __init__(self, bench: Bench, probe: CostProbe) -> None:
        super().__init__(bench.options, bench.executor)
        self.probe = probe
        self.costs: dict[int, dict[str, float]] = {}

    async def step(self, target: Target, server: ServerProcess, rate: float, duration_s: float) -> StepResult:
        quiet0 = await self.probe.snapshot()
        await asyncio.sleep(QUIET_WINDOW_S)
        quiet1 = await self.probe.snapshot()
        idle = CostProbe.cpu_s(quiet0, quiet1)
        # The fleet idles in the window: what the machine did then is someone else's load.
        quiet_foreign = (
            max(0.0, idle["machine"] - idle["api"] - idle["haproxy"] - idle["postgres"]) / idle["wall"]
        )
        result = await super().step(target, server, rate, duration_s)
        spent = CostProbe.cpu_s(quiet1, await self.probe.snapshot())
        spent["generator"] = result.counts.cpu_s
        ours = sum(spent[k] for k in PARTS)
        # Whatever else kept the machine busy meanwhile: other users' work, and kernel time no process
        # was billed for (softirq ticks land in the interrupted process's system time here, so the
        # loopback traffic is mostly in the parts above). Cores: charged over the step's wall time.
        spent["foreign_cores"] = max(0.0, spent["machine"] - ours) / spent["wall"]
        spent["quiet_foreign_cores"] = quiet_foreign
        # The fleet's own CPU while idle (its background loops: probes, polls, health checks), per
        # process: a fixed cost per API process, beside the per-request one.
        spent["idle_api_cores_per_process"] = idle["api"] / idle["wall"] / len(self.probe.fleet.instances)
        self.costs[id(result)] = spent
        return result

    def breakdown(self, result: StepResult) -> dict[str, Any] | None:
        """The step's CPU ms per finished request per part, the cores each kept busy, and the foreign
        load (cores); None if the step was not probed."""
        spent = self.costs.get(id(result))
        finished = result.counts.finished
        if spent is None or finished <= 0:
            return None
        wall = spent["wall"]
        return {
            "cpu_ms_per_request": {k: round(spent[k] / finished * 1000, 4) for k in PARTS},
            "cores": {k: round(spent[k] / wall, 3) for k in (*PARTS, "machine")},
            "foreign_cores": round(spent["foreign_cores"], 3),
            "quiet_foreign_cores": round(spent["quiet_foreign_cores"], 3),
            "idle_api_cores_per_process": round(spent["idle_api_cores_per_process"], 4),
        }
