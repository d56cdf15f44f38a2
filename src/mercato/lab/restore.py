"""`mercato lab restore`: the disaster-recovery drill — write, note T, keep writing, lose every node's
data, restore to T from pgBackRest; exactly the rows committed before T come back.

Hypothesis (guide §24, the Disaster Recovery checklist "backups tested, RTO/RPO documented"): with a
full and an incremental backup plus continuous WAL archiving, a point-in-time restore to T returns
every transaction committed before T (RPO 0 at T) and none after, in a bounded time (the restore's
RTO: from the start of the restore to the restored server accepting writes). Then the bad inputs
an operator can give — a time before the first backup, a WAL segment missing from the archive — are
refused with a clear message and leave the restored folder unused. Finally the restored copy is put
into service (`mercato.cluster.adopt`: it becomes the primary, the other nodes re-clone it) and the
RTO from the start of the restore to the first write through the shop's URL is measured.

The run folder gets `report.json` and `report.md`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from mercato.cluster import cluster_down, cluster_status, cluster_up
from mercato.cluster.adopt import adopt_restored
from mercato.cluster.backup import BackupFailed, backup, restore_and_start, stop_scratch
from mercato.cluster.patroni import node_dir, stop_patroni
from mercato.cluster.processes import make_traversable
from mercato.cluster.topology import Topology

__all__ = ["RestoreReport", "run_restore_drill"]


@dataclass
class RestoreReport:
    before_t: int = 0
    after_t: int = 0
    restored: int = 0
    missing_before_t: int = 0
    present_after_t: int = 0
    full_backup_s: float = 0.0
    incr_backup_s: float = 0.0
    restore_rto_s: float = 0.0
    refused: dict[str, str] = field(default_factory=dict)
    # Put into service (`mercato.cluster.adopt`): the restored copy becomes the cluster's primary.
    adopt_primary_s: float = 0.0
    adopt_replicas_s: float = 0.0
    serving_rto_s: float = 0.0  # restore start -> the shop's URL takes a write on the restored data
    rows_after_adopt: int = 0
    replicas_streaming: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.before_t > 0
            and self.missing_before_t == 0
            and self.present_after_t == 0
            and self.restored == self.before_t
            and set(self.refused) == {"time_before_first_backup", "missing_wal"}
            and self.rows_after_adopt == self.before_t + 1
        )


async def _sql(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=5.0)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _write(dsn: str, first: int, count: int) -> list[int]:
    conn = await asyncpg.connect(dsn, timeout=5.0)
    try:
        for n in range(first, first + count):
            await conn.execute("INSERT INTO lab_restore_orders (id) VALUES ($1)", n)  # one commit each
    finally:
        await conn.close()
    return list(range(first, first + count))


def _destroy(topology: Topology) -> None:
    """The disaster: every node stopped and its data folder deleted (the repository survives)."""
    stop_patroni(topology)
    for node in topology.postgres:
        shutil.rmtree(node_dir(topology, node) / "data", ignore_errors=True)


async def run_restore_drill(*, rows: int = 300, out: Path | None = None) -> RestoreReport:
    report = RestoreReport()
    root = Path(tempfile.mkdtemp(prefix="mercato-restore-"))
    make_traversable(root)
    try:
        topology = await asyncio.to_thread(
            cluster_up, root / "cluster", synchronous_mode=False, nats_cluster=False, backups=True
        )
        dsn = topology.database_url(driver="postgresql")
        await _sql(
            dsn,
            "CREATE TABLE lab_restore_orders (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
        )
        started = time.monotonic()
        await asyncio.to_thread(backup, topology, kind="full")
        report.full_backup_s = time.monotonic() - started
        before = await _write(dsn, 1, rows // 2)
        started = time.monotonic()
        await asyncio.to_thread(backup, topology, kind="incr")
        report.incr_backup_s = time.monotonic() - started
        before += await _write(dsn, rows // 2 + 1, rows // 2)
        await asyncio.sleep(0.5)
        t = datetime.now(UTC)
        await asyncio.sleep(0.5)
        after = await _write(dsn, rows + 1, rows // 2)
        await _sql(dsn, "SELECT pg_switch_wal()")  # close the segment holding T so it is archived
        await asyncio.sleep(2.0)
        report.before_t, report.after_t = len(before), len(after)
        await asyncio.to_thread(_destroy, topology)

        target = root / "restored"
        scratch = await asyncio.to_thread(restore_and_start, topology, target, to_time=t)
        report.restore_rto_s = scratch.ready_s
        ids = {r["id"] for r in await _sql(scratch.url(), "SELECT id FROM lab_restore_orders")}
        await asyncio.to_thread(stop_scratch, target)
        report.restored = len(ids)
        report.missing_before_t = sum(1 for n in before if n not in ids)
        report.present_after_t = sum(1 for n in after if n in ids)

        # Bad input 1: a time before the first backup finished.
        try:
            await asyncio.to_thread(restore_to_scratch, topology, root / "too-early", t - timedelta(days=1))
        except BackupFailed as exc:
            report.refused["time_before_first_backup"] = str(exc)[:200]
        # Bad input 2: the WAL segment recovery needs is gone from the archive.
        archive = topology.dir("pgbackrest", "repo", "archive")
        segments = sorted(p for p in archive.rglob("0000000*") if p.is_file())
        if segments:
            segments[-1].unlink()
            try:
                await asyncio.to_thread(
                    restore_to_scratch, topology, root / "no-wal", t + timedelta(seconds=5)
                )
            except BackupFailed as exc:
                report.refused["missing_wal"] = str(exc).splitlines()[0][:200]

        # Into service: the restored (and checked) copy becomes the primary; the shop's multi-host
        # URL reaches it; the other nodes clone it.
        adopt_started = time.monotonic()
        adopted = await asyncio.to_thread(adopt_restored, topology, target)
        dsn = adopted.topology.database_url(driver="postgresql")
        await _write(dsn, 10 * rows + 1, 1)
        report.serving_rto_s = report.restore_rto_s + (time.monotonic() - adopt_started)
        report.adopt_primary_s, report.adopt_replicas_s = adopted.primary_s, adopted.replicas_s
        report.rows_after_adopt = len(await _sql(dsn, "SELECT id FROM lab_restore_orders"))
        state = await asyncio.to_thread(cluster_status, adopted.topology)
        report.replicas_streaming = sum(
            1
            for n in state.nodes
            if n.role in ("replica", "sync_standby") and n.state in ("streaming", "running")
        )
    finally:
        await asyncio.to_thread(cluster_down, root / "cluster", purge=True)
        for name in ("too-early", "no-wal"):
            await asyncio.to_thread(stop_scratch, root / name)
        shutil.rmtree(root, ignore_errors=True)
    if out is not None:
        await asyncio.to_thread(_write_run_folder, out, report)
    return report


def _write_run_folder(out: Path, report: RestoreReport) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    (out / "report.md").write_text(report_table(report))


def restore_to_scratch(topology: Topology, target: Path, when: datetime) -> None:
    restore_and_start(topology, target, to_time=when, timeout_s=30.0)
    stop_scratch(target)


def report_rows(r: RestoreReport) -> list[tuple[str, str, str]]:
    return [
        ("rows committed before T / after T", f"{r.before_t} / {r.after_t}", ""),
        ("restored rows", str(r.restored), f"= {r.before_t}"),
        ("rows before T missing (RPO at T)", str(r.missing_before_t), "0"),
        ("rows after T present", str(r.present_after_t), "0"),
        ("full / incremental backup", f"{r.full_backup_s:.1f} s / {r.incr_backup_s:.1f} s", ""),
        ("restore RTO (restore start → server open)", f"{r.restore_rto_s:.1f} s", ""),
        ("time before first backup", r.refused.get("time_before_first_backup", "NOT refused"), "refused"),
        ("missing WAL segment", r.refused.get("missing_wal", "NOT refused"), "refused"),
        (
            "adopt: restored copy is primary / replicas re-cloned",
            f"{r.adopt_primary_s:.1f} s / {r.adopt_replicas_s:.1f} s ({r.replicas_streaming} streaming)",
            "",
        ),
        ("RTO restore start → shop URL takes a write", f"{r.serving_rto_s:.1f} s", ""),
        ("rows after adopt (before T + 1 new write)", str(r.rows_after_adopt), f"= {r.before_t + 1}"),
    ]


def report_table(r: RestoreReport) -> str:
    lines = [
        f"# Restore drill: {'PASS' if r.ok else 'FAIL'}",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in report_rows(r)]
    return "\n".join(lines) + "\n"
