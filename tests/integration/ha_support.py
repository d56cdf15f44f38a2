"""A Patroni/etcd cluster for the HA tests: started once per module in a /tmp folder the PostgreSQL OS
user can reach (pytest's own tmp folders are 0700), torn down and deleted at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mercato.cluster import Topology, cluster_down, cluster_up


def need_ha_binaries() -> None:
    for binary in ("etcd", "patroni"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} not installed (apt-get install etcd-server patroni)")


@contextmanager
def running_cluster(*, synchronous_mode: bool = False, nats_cluster: bool = False) -> Iterator[Topology]:
    need_ha_binaries()
    root = Path(tempfile.mkdtemp(prefix="mercato-ha-test-"))
    root.chmod(0o755)
    try:
        yield cluster_up(root / "cluster", synchronous_mode=synchronous_mode, nats_cluster=nats_cluster)
    finally:
        cluster_down(root / "cluster", purge=True)
        shutil.rmtree(root, ignore_errors=True)
