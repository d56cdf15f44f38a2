"""Put a restored copy into service: it becomes the primary of the cluster, the replicas re-clone.

`mercato restore --cluster` leaves the restored copy in its own folder, open on its own port, so it
can be checked (`mercato backup verify`'s invariants) while nothing points at it. Adopting it:

1. stops the shop's processes on the cluster (nothing may write to the old nodes meanwhile), the
   restored copy's scratch server, and every Patroni node (their PostgreSQL too);
2. moves each node's old data folder aside to `data.replaced-<time>` (never deleted: a post-mortem
   may need it) and the restored folder into the first node's place;
3. drops the recovery settings pgBackRest wrote into `postgresql.auto.conf` (they would steer the
   node's next recovery — as a replica after a failover — to the restore's target);
4. starts Patroni under a **new scope** (`<scope>-r<N>`, saved in `topology.json`): Patroni finds a
   non-empty data folder and no cluster in etcd under that name, so it takes the folder over as the
   primary (its documented way to adopt a standalone server) instead of the old cluster's leader
   and history; the other nodes, now empty, clone it with pg_basebackup.

WAL archiving continues into the same pgBackRest stanza (same system identifier; the restore
promoted onto a timeline the archive had not used). Take a full backup right after: incremental
backups of the old timeline do not chain onto the new one.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mercato.cluster.backup import archive_settings, config_path, stop_scratch
from mercato.cluster.patroni import node_dir, start_patroni, stop_patroni
from mercato.cluster.processes import chown_to_pg
from mercato.cluster.shop import stop_shop
from mercato.cluster.topology import Topology

__all__ = ["AdoptResult", "adopt_restored"]

# What pgBackRest's restore writes for the recovery it sets up; meaningless once the copy is promoted.
_RECOVERY_KEYS = (
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_action",
    "recovery_target_timeline",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "archive_mode",
)


@dataclass(frozen=True)
class AdoptResult:
    topology: Topology
    moved_aside: tuple[Path, ...]
    primary_s: float  # adopt start -> the restored copy is Patroni's primary
    replicas_s: float  # adopt start -> every replica cloned and streaming


def _clean_recovery_settings(data: Path) -> None:
    auto = data / "postgresql.auto.conf"
    if auto.exists():
        kept = [
            line
            for line in auto.read_text().splitlines()
            if line.split("=", 1)[0].strip() not in _RECOVERY_KEYS
        ]
        auto.write_text("\n".join(kept) + "\n")
    for name in ("recovery.signal", "standby.signal", "postmaster.pid"):
        (data / name).unlink(missing_ok=True)


def _next_scope(scope: str) -> str:
    base, _, n = scope.rpartition("-r")
    if base and n.isdigit():
        return f"{base}-r{int(n) + 1}"
    return f"{scope}-r1"


def adopt_restored(topology: Topology, restored: Path, *, timeout_s: float = 120.0) -> AdoptResult:
    """Make the restored data folder `restored` the primary of the cluster (see the module doc)."""
    if not (restored / "PG_VERSION").exists():
        raise FileNotFoundError(f"{restored} holds no PostgreSQL data folder (no PG_VERSION)")
    started = time.monotonic()
    stop_shop(topology)
    stop_scratch(restored)
    stop_patroni(topology)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved: list[Path] = []
    for node in topology.postgres:
        data = node_dir(topology, node) / "data"
        if data.exists():
            aside = data.with_name(f"data.replaced-{stamp}")
            data.rename(aside)
            moved.append(aside)
    first = node_dir(topology, topology.postgres[0]) / "data"
    first.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(restored), str(first))
    _clean_recovery_settings(first)
    chown_to_pg(first)
    first.chmod(0o700)
    adopted = dataclasses.replace(topology, scope=_next_scope(topology.scope))
    adopted.save()
    archive = archive_settings(adopted) if config_path(adopted).exists() else None
    primary_s = 0.0

    def primary_ready() -> None:
        nonlocal primary_s
        primary_s = time.monotonic() - started

    start_patroni(adopted, archive=archive, timeout_s=timeout_s, on_primary=primary_ready)
    return AdoptResult(adopted, tuple(moved), primary_s, time.monotonic() - started)
