"""Three PostgreSQL 15 nodes managed by Patroni over the cluster's etcd (ADR 0031).

Patroni (Debian's `patroni` package) bootstraps the first node with initdb, clones the others with
pg_basebackup, keeps one leader key in etcd, creates a physical replication slot per member, runs
`synchronous_mode` when asked, and rewinds a demoted primary with pg_rewind. We only write its YAML
(JSON is YAML) and read its REST API; the consensus and the promotion are Patroni's.

The failover timings are tuned down from Patroni's defaults (ttl 30 s, loop_wait 10 s,
retry_timeout 10 s, a crashed primary restarted in place for up to 300 s) so that a dead primary is
replaced in well under 15 s on loopback: see `FAILOVER_TIMINGS` and ADR 0031.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from mercato.cluster.processes import (
    chown_to_pg,
    make_traversable,
    spawn,
    stop,
    wait_until,
)
from mercato.cluster.topology import PostgresNode, Topology

PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
PATRONI_BIN = "patroni"

# Why these numbers (ADR 0031): the leader key lives `ttl` seconds; a replica runs its HA loop every
# `loop_wait`; a DCS or PostgreSQL call is retried for `retry_timeout`. Patroni needs
# ttl >= loop_wait + 2 * retry_timeout so that a healthy leader always renews in time. Loopback etcd
# answers in milliseconds, so 3 s of retries is plenty; a leader whose PostgreSQL crashed is demoted
# at once (`primary_start_timeout: 0`) instead of being restarted in place for up to 5 minutes.
FAILOVER_TIMINGS: dict[str, int] = {
    "ttl": 10,
    "loop_wait": 2,
    "retry_timeout": 3,
    "primary_start_timeout": 0,
}


@dataclass(frozen=True)
class ArchiveSettings:
    """Continuous WAL archiving through pgBackRest (set by `mercato.cluster.backup`)."""

    archive_command: str
    restore_command: str


def node_dir(topology: Topology, node: PostgresNode) -> Path:
    return topology.dir("postgres", node.name)


def patroni_config(
    topology: Topology, node: PostgresNode, *, archive: ArchiveSettings | None = None
) -> dict[str, Any]:
    folder = node_dir(topology, node)
    parameters: dict[str, Any] = {
        "wal_level": "replica",
        "hot_standby": "on",
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "wal_log_hints": "on",  # pg_rewind needs it (or data checksums; we have both)
        "hot_standby_feedback": "on",
        "max_connections": 100,
        "shared_buffers": "32MB",
        "wal_keep_size": "128MB",
        "track_commit_timestamp": "on",  # replay-lag seconds and the restore drill's T
    }
    if archive is not None:
        parameters.update(archive_mode="on", archive_command=archive.archive_command)
    hba = [
        "local all all trust",
        "host all all 127.0.0.1/32 trust",
        "host replication all 127.0.0.1/32 trust",
    ]
    postgresql: dict[str, Any] = {
        "listen": f"127.0.0.1:{node.pg_port}",
        "connect_address": f"127.0.0.1:{node.pg_port}",
        "data_dir": str(folder / "data"),
        "bin_dir": str(PG_BIN_DIR),
        "pgpass": str(folder / "pgpass"),
        # The lab trusts loopback (no secrets in its files); a real deployment uses scram + TLS.
        "authentication": {
            "superuser": {"username": "postgres"},
            "replication": {"username": "postgres"},
            "rewind": {"username": "postgres"},
        },
        "parameters": {"unix_socket_directories": str(folder)},
        "pg_hba": hba,
        "use_unix_socket": True,
    }
    if archive is not None:
        postgresql["recovery_conf"] = {"restore_command": archive.restore_command}
    return {
        "scope": topology.scope,
        "name": node.name,
        "log": {"level": "WARNING"},
        "restapi": {
            "listen": f"127.0.0.1:{node.rest_port}",
            "connect_address": f"127.0.0.1:{node.rest_port}",
        },
        "etcd3": {"hosts": [f"127.0.0.1:{m.client_port}" for m in topology.etcd]},
        "bootstrap": {
            "dcs": {
                **FAILOVER_TIMINGS,
                "maximum_lag_on_failover": 16 * 1024 * 1024,
                "synchronous_mode": topology.synchronous_mode,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": parameters,
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
        },
        "postgresql": postgresql,
        "tags": {"nofailover": False, "noloadbalance": False},
    }


def start_patroni(
    topology: Topology,
    *,
    archive: ArchiveSettings | None = None,
    timeout_s: float = 90.0,
    on_primary: Callable[[], None] | None = None,
) -> None:
    """Start Patroni on every node, the first alone until it is primary (`on_primary` is called
    then), and wait until the others stream from it. A first node with a non-empty data folder and
    no cluster of this scope in etcd is taken over as is (`mercato.cluster.adopt`)."""
    binary = shutil.which(PATRONI_BIN)
    if binary is None:
        raise RuntimeError("patroni not found: apt-get install patroni")
    make_traversable(topology.root)
    for node in topology.postgres:
        folder = node_dir(topology, node)
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "patroni.yml"
        config.write_text(json.dumps(patroni_config(topology, node, archive=archive), indent=2))
        chown_to_pg(folder)
    first, *others = topology.postgres
    # The first node bootstraps alone, so it wins the initialize race deterministically and the
    # others clone from it instead of each running initdb.
    spawn(node_dir(topology, first), "patroni", [binary, "patroni.yml"], as_pg=True)
    if not wait_until(lambda: _role(first) == "primary", timeout_s=timeout_s, interval_s=0.5):
        raise RuntimeError(f"{first.name} did not become primary; see {node_dir(topology, first)}")
    if on_primary is not None:
        on_primary()
    for node in others:
        spawn(node_dir(topology, node), "patroni", [binary, "patroni.yml"], as_pg=True)
    if not wait_until(lambda: _all_streaming(topology), timeout_s=timeout_s, interval_s=0.5):
        raise RuntimeError("replicas did not start streaming; see postgres/*/patroni.log")


def restart_patroni_node(topology: Topology, node: PostgresNode) -> int:
    """Start the Patroni of one node again (what its supervisor — systemd — does after a crash)."""
    binary = shutil.which(PATRONI_BIN)
    if binary is None:
        raise RuntimeError("patroni not found: apt-get install patroni")
    return spawn(node_dir(topology, node), "patroni", [binary, "patroni.yml"], as_pg=True)


def stop_patroni(topology: Topology) -> None:
    # Replicas first: a primary stopped first would make them race to promote on the way down.
    for node in sorted(topology.postgres, key=lambda n: _role(n) == "primary"):
        stop(node_dir(topology, node), "patroni", timeout_s=30.0)
        _kill_orphan_postmaster(topology, node)


def _kill_orphan_postmaster(topology: Topology, node: PostgresNode) -> None:
    """A Patroni killed with SIGKILL leaves its PostgreSQL running: stop that one too."""
    import os
    import signal

    pidfile = node_dir(topology, node) / "data" / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
    except ProcessLookupError:
        return


def postmaster_pid(topology: Topology, node: PostgresNode) -> int | None:
    try:
        return int((node_dir(topology, node) / "data" / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def patroni_get(node: PostgresNode, path: str, *, timeout_s: float = 1.0) -> httpx.Response:
    return httpx.get(f"{node.rest_url}{path}", timeout=timeout_s)


def cluster_members(topology: Topology) -> list[dict[str, Any]]:
    """Patroni's view of the members (`GET /cluster` on the first node that answers)."""
    for node in topology.postgres:
        try:
            reply = patroni_get(node, "/cluster")
        except httpx.HTTPError:
            continue
        if reply.status_code == 200:
            members: list[dict[str, Any]] = reply.json().get("members", [])
            return members
    return []


def primary_node(topology: Topology) -> PostgresNode | None:
    names = {m["name"] for m in cluster_members(topology) if m.get("role") == "leader"}
    return next((n for n in topology.postgres if n.name in names), None)


def set_apply_delay(topology: Topology, node: PostgresNode, delay_ms: int | None) -> None:
    """Make `node` replay WAL `delay_ms` late (None: on time), through Patroni: it owns the recovery
    settings and would undo an ALTER SYSTEM within a loop. For labs and tests of stale reads."""
    path = node_dir(topology, node) / "patroni.yml"
    config = json.loads(path.read_text())
    recovery = config["postgresql"].setdefault("recovery_conf", {})
    if delay_ms:
        recovery["recovery_min_apply_delay"] = f"{delay_ms}ms"
    else:
        recovery.pop("recovery_min_apply_delay", None)
    path.write_text(json.dumps(config, indent=2))
    chown_to_pg(path)
    httpx.post(f"{node.rest_url}/reload", timeout=5.0).raise_for_status()
    expected = f"{delay_ms}ms" if delay_ms else "0"

    async def current() -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=node.pg_port, user="postgres", database="postgres"
        )
        try:
            return str(await conn.fetchval("SHOW recovery_min_apply_delay"))
        finally:
            await conn.close()

    def applied() -> bool:
        value = asyncio.run(current())
        return value == expected or (delay_ms is not None and value == f"{delay_ms / 1000:g}s")

    if not wait_until(applied, timeout_s=30.0, interval_s=0.3):
        raise RuntimeError(f"{node.name}: recovery_min_apply_delay not {expected} after reload")


def create_database_on_primary(topology: Topology, name: str) -> None:
    """CREATE DATABASE `name` on the current primary unless it exists (replicas get it by WAL)."""

    async def create() -> None:
        conn = await asyncpg.connect(topology.database_url(driver="postgresql"), timeout=5)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())


def _role(node: PostgresNode) -> str | None:
    try:
        reply = patroni_get(node, "/patroni")
    except httpx.HTTPError:
        return None
    if reply.status_code not in (200, 503):
        return None
    data = reply.json()
    if data.get("state") != "running":
        return None
    role = data.get("role")
    return "primary" if role in ("master", "primary") else str(role)


def _all_streaming(topology: Topology) -> bool:
    members = cluster_members(topology)
    replicas = [m for m in members if m.get("role") in ("replica", "sync_standby")]
    return len(replicas) == len(topology.postgres) - 1 and all(
        m.get("state") in ("streaming", "running") for m in replicas
    )
