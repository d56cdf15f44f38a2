"""A 3-node NATS JetStream cluster (`mercato cluster`'s): streams made by the kit's JetStreamStream
at replicas=3 survive the SIGKILL of the node leading them with no acknowledged message lost."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mercato.cluster.nats import start_nats, stop_nats
from mercato.cluster.topology import Topology
from mercato.lab.nats_failover import run_nats_failover

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def nats_cluster() -> Iterator[Topology]:
    if shutil.which("nats-server") is None:
        pytest.skip("nats-server not installed")
    root = Path(tempfile.mkdtemp(prefix="mercato-nats-test-"))
    topology = Topology.plan(root)
    topology.save()
    try:
        start_nats(topology)
        yield topology
    finally:
        stop_nats(topology)
        shutil.rmtree(root, ignore_errors=True)


async def test_killing_the_stream_leader_loses_no_acknowledged_message(nats_cluster: Topology) -> None:
    # Bounded well inside the test's timeout: a slow re-election reports, it does not hang.
    result = await run_nats_failover(
        nats_cluster, messages=600, rate_per_s=300.0, down_s=2.0, deadline_s=110.0
    )
    assert not result.out_of_time, result
    assert result.killed
    assert result.acked == 600
    assert result.lost == 0
