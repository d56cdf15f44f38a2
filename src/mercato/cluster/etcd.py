"""A three-member etcd: the consensus store Patroni keeps its leader key in (we never write our own
consensus, guide §7). Debian's `etcd-server` binary, one data folder per member."""

from __future__ import annotations

import shutil

import httpx

from mercato.cluster.processes import spawn, stop, wait_until
from mercato.cluster.topology import EtcdMember, Topology

ETCD_BIN = "etcd"


def start_etcd(topology: Topology, *, timeout_s: float = 30.0) -> None:
    for member in topology.etcd:
        start_etcd_member(topology, member)
    folder = topology.dir("etcd")
    if not wait_until(lambda: etcd_healthy(topology), timeout_s=timeout_s, interval_s=0.5):
        raise RuntimeError(f"etcd did not become healthy in {timeout_s:.0f} s; see {folder}/*.log")


def start_etcd_member(topology: Topology, member: EtcdMember) -> int:
    """Start (or restart, on its existing data folder) one member; its pid."""
    binary = shutil.which(ETCD_BIN)
    if binary is None:
        raise RuntimeError("etcd not found: apt-get install etcd-server")
    initial = ",".join(f"{m.name}={m.peer_url}" for m in topology.etcd)
    folder = topology.dir("etcd")
    return spawn(
        folder,
        member.name,
        [
            binary,
            "--name", member.name,
            "--data-dir", str(folder / f"{member.name}.data"),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", f"{topology.scope}-etcd",
            "--initial-cluster-state", "new",
            # A loaded laptop misses 100 ms heartbeats; these keep elections calm without
            # slowing Patroni, whose own ttl is seconds.
            "--heartbeat-interval", "200",
            "--election-timeout", "2000",
            "--logger", "zap",
            "--log-level", "warn",
        ],
    )  # fmt: skip


def stop_etcd_member(topology: Topology, member: EtcdMember) -> bool:
    """Stop one member (a fault drill): the others keep a quorum while a majority runs."""
    return stop(topology.dir("etcd"), member.name)


def etcd_healthy(topology: Topology) -> bool:
    """True when a majority of members answer /health with health=true."""
    healthy = 0
    for member in topology.etcd:
        try:
            reply = httpx.get(f"{member.client_url}/health", timeout=1.0)
            if reply.status_code == 200 and reply.json().get("health") in (True, "true"):
                healthy += 1
        except httpx.HTTPError:
            continue
    return healthy > len(topology.etcd) // 2


def stop_etcd(topology: Topology) -> None:
    for member in topology.etcd:
        stop(topology.dir("etcd"), member.name)
