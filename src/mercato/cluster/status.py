"""`mercato cluster status`: each PostgreSQL node's role, timeline and replication lag (bytes and
seconds), and each JetStream stream's leader, read from Patroni's REST API, the primary's
`pg_stat_replication` and JetStream's stream info."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from mercato.cluster.nats import stream_leaders
from mercato.cluster.patroni import cluster_members
from mercato.cluster.processes import alive, read_pid
from mercato.cluster.topology import Topology


@dataclass
class NodeStatus:
    name: str
    port: int
    role: str
    state: str
    timeline: int | None
    lag_bytes: int | None
    lag_s: float | None
    sync_state: str | None = None


@dataclass
class ClusterStatus:
    etcd_up: int
    nodes: list[NodeStatus]
    nats_up: int
    streams: list[dict[str, Any]] = field(default_factory=list)

    @property
    def primary(self) -> NodeStatus | None:
        return next((n for n in self.nodes if n.role == "leader"), None)


async def _replication(port: int) -> dict[str, tuple[int, float, str]]:
    """From the primary: per standby (application_name = Patroni member name), replay lag in bytes,
    in seconds (PostgreSQL's `replay_lag`, NULL once idle and caught up → 0) and sync state."""
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres", timeout=2)
    try:
        rows = await conn.fetch(
            "SELECT application_name, sync_state,"
            " COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint AS lag_bytes,"
            " COALESCE(EXTRACT(EPOCH FROM replay_lag), 0)::float8 AS lag_s"
            " FROM pg_stat_replication"
        )
    finally:
        await conn.close()
    return {r["application_name"]: (int(r["lag_bytes"]), float(r["lag_s"]), r["sync_state"]) for r in rows}


def cluster_status(topology: Topology) -> ClusterStatus:
    members = {m["name"]: m for m in cluster_members(topology)}
    primary = next((m for m in members.values() if m.get("role") == "leader"), None)
    replication: dict[str, tuple[int, float, str]] = {}
    if primary is not None:
        with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
            replication = asyncio.run(_replication(int(primary["port"])))
    nodes: list[NodeStatus] = []
    for node in topology.postgres:
        m = members.get(node.name, {})
        lag = replication.get(node.name)
        role = str(m.get("role", "down"))
        nodes.append(
            NodeStatus(
                name=node.name,
                port=node.pg_port,
                role=role,
                state=str(m.get("state", "unreachable")),
                timeline=m.get("timeline"),
                lag_bytes=0 if role == "leader" else (lag[0] if lag else m.get("lag")),
                lag_s=0.0 if role == "leader" else (lag[1] if lag else None),
                sync_state=lag[2] if lag else None,
            )
        )
    nats_up = [n for n in topology.nats if alive(read_pid(topology.dir("nats"), n.name))]
    streams: list[dict[str, Any]] = []
    if nats_up:
        with contextlib.suppress(Exception):
            streams = asyncio.run(stream_leaders([n.url for n in nats_up]))
    return ClusterStatus(
        etcd_up=sum(alive(read_pid(topology.dir("etcd"), m.name)) for m in topology.etcd),
        nodes=nodes,
        nats_up=len(nats_up),
        streams=streams,
    )
