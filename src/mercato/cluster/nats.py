"""A three-node NATS cluster with JetStream: every stream we create is kept on three nodes (R3),
so one node lost loses no acknowledged message (JetStream's own Raft; we add none).

Debian's `nats-server`, one config file and one store folder per node, routes between all three.
"""

from __future__ import annotations

import shutil
from typing import Any

import httpx
import nats
from nats.js.api import StorageType

from mercato.cluster.processes import spawn, stop, wait_until
from mercato.cluster.topology import NatsNode, Topology

NATS_BIN = "nats-server"
CLUSTER_NAME = "mercato"


def nats_config(topology: Topology, node: NatsNode) -> str:
    folder = topology.dir("nats")
    routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in topology.nats if n != node)
    return "\n".join(
        [
            f"server_name: {node.name}",
            f"listen: 127.0.0.1:{node.client_port}",
            f"http: 127.0.0.1:{node.monitor_port}",
            f'jetstream {{ store_dir: "{folder / (node.name + ".js")}", max_mem: 64MB, max_file: 1GB }}',
            f"cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{node.cluster_port}, routes: [{routes}] }}",
            "",
        ]
    )


def start_nats(topology: Topology, *, timeout_s: float = 30.0) -> None:
    binary = shutil.which(NATS_BIN)
    if binary is None:
        raise RuntimeError("nats-server not found: apt-get install nats-server")
    folder = topology.dir("nats")
    folder.mkdir(parents=True, exist_ok=True)
    for node in topology.nats:
        config = folder / f"{node.name}.conf"
        config.write_text(nats_config(topology, node))
        spawn(folder, node.name, [binary, "-c", str(config)])
    if not wait_until(lambda: nats_ready(topology), timeout_s=timeout_s, interval_s=0.5):
        raise RuntimeError(f"NATS JetStream cluster not ready in {timeout_s:.0f} s; see {folder}/*.log")


def start_nats_node(topology: Topology, node: NatsNode) -> None:
    """Restart one node (after a kill): same config, same store, it catches up through Raft."""
    binary = shutil.which(NATS_BIN) or NATS_BIN
    folder = topology.dir("nats")
    spawn(folder, node.name, [binary, "-c", str(folder / f"{node.name}.conf")])


def nats_ready(topology: Topology) -> bool:
    """Every node healthy with JetStream on and a meta leader elected."""
    for node in topology.nats:
        try:
            health = httpx.get(f"http://127.0.0.1:{node.monitor_port}/healthz", timeout=1.0)
            if health.status_code != 200:
                return False
            jsz = httpx.get(f"http://127.0.0.1:{node.monitor_port}/jsz", timeout=1.0).json()
        except (httpx.HTTPError, ValueError):
            return False
        if not (jsz.get("meta_cluster") or {}).get("leader"):
            return False
    return True


def stop_nats(topology: Topology) -> None:
    for node in topology.nats:
        stop(topology.dir("nats"), node.name)


async def stream_leaders(servers: list[str], *, timeout_s: float = 3.0) -> list[dict[str, Any]]:
    """Every stream's name, replica count, Raft leader and replicas' currency, as JetStream sees it."""
    nc = await nats.connect(
        servers, connect_timeout=timeout_s, allow_reconnect=False, error_cb=_quiet, max_reconnect_attempts=0
    )
    try:
        js = nc.jetstream(timeout=timeout_s)
        out: list[dict[str, Any]] = []
        for info in await js.streams_info():
            cluster = info.cluster
            out.append(
                {
                    "stream": info.config.name,
                    "replicas": info.config.num_replicas,
                    "messages": info.state.messages,
                    "leader": cluster.leader if cluster else None,
                    "followers": [
                        {"name": r.name, "current": r.current, "lag": r.lag}
                        for r in (cluster.replicas or [] if cluster else [])
                    ],
                }
            )
        return out
    finally:
        await nc.close()


async def _quiet(_exc: Exception) -> None:
    """A node down is what `status` reports, not a traceback to print."""


async def ensure_stream(servers: list[str], name: str, subjects: list[str], *, replicas: int = 3) -> None:
    """Create (or keep) a file-backed stream with `replicas` copies (the cluster's probe stream)."""
    nc = await nats.connect(servers, connect_timeout=3.0)
    try:
        js = nc.jetstream(timeout=5.0)
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=name, subjects=subjects, storage=StorageType.FILE, num_replicas=replicas)
    finally:
        await nc.close()
