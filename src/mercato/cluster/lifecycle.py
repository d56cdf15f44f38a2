"""Bring the local HA topology up and down: etcd first, Patroni (primary first), then NATS; down in the
reverse order, PostgreSQL before etcd so Patroni can step down cleanly."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from mercato.cluster.backup import archive_settings, stanza_create, write_config
from mercato.cluster.etcd import start_etcd, stop_etcd
from mercato.cluster.nats import ensure_stream, start_nats, stop_nats
from mercato.cluster.patroni import ArchiveSettings, start_patroni, stop_patroni
from mercato.cluster.shop import stop_shop
from mercato.cluster.topology import Topology

PROBE_STREAM = "mercato_cluster_probe"


def cluster_up(
    root: Path,
    *,
    synchronous_mode: bool = True,
    nats_cluster: bool = True,
    backups: bool = False,
    members: int = 3,
) -> Topology:
    """Plan ports, start etcd, Patroni (primary first) and NATS, and wait for each to be healthy.
    On any failure everything started so far is stopped again. `members=1` is a single-node
    "cluster" (one etcd, one Patroni-managed PostgreSQL) for tests that need pgBackRest, not HA."""
    if (root / "topology.json").exists():
        raise FileExistsError(
            f"a cluster already lives in {root}: `mercato cluster down` first (its files stay for a"
            " post-mortem unless you pass --purge)"
        )
    topology = Topology.plan(root, synchronous_mode=synchronous_mode and members > 1, members=members)
    topology.save()
    try:
        start_etcd(topology)
        archive: ArchiveSettings | None = None
        if backups:  # WAL archived to pgBackRest's repository from the first segment on
            write_config(topology)
            archive = archive_settings(topology)
        start_patroni(topology, archive=archive)
        if backups:
            stanza_create(topology)
        if nats_cluster:
            start_nats(topology)
            asyncio.run(ensure_stream(topology.nats_urls, PROBE_STREAM, ["mercato_cluster_probe.>"]))
    except BaseException:
        cluster_down(root, purge=False)
        raise
    return topology


def cluster_down(root: Path, *, purge: bool = True) -> bool:
    """Stop every process of the cluster in `root` (PostgreSQL before etcd: Patroni needs etcd to
    step down cleanly), then delete the folder unless `purge` is False (kept for a post-mortem: its
    logs). False if there was no cluster."""
    try:
        topology = Topology.load(root)
    except FileNotFoundError:
        return False
    stop_shop(topology)  # its clients first, so nothing writes while PostgreSQL stops
    stop_patroni(topology)
    stop_nats(topology)
    stop_etcd(topology)
    if purge:
        shutil.rmtree(root, ignore_errors=True)
    return True


__all__ = ["PROBE_STREAM", "cluster_down", "cluster_up"]
