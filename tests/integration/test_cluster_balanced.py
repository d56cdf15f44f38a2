"""`mercato cluster up --shop --api-instances 2`: the shop's API as two processes behind HAProxy on
the HA cluster (Patroni, NATS), shown by `mercato cluster status`, rolled by `mercato cluster roll`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.cluster.haproxy import haproxy_binary
from mercato.cluster.patroni import create_database_on_primary
from mercato.cluster.shop import SHOP_DATABASE, shop_fleet, start_shop, stop_shop
from mercato.kit.storage.migrations import upgrade
from tests.integration.ha_support import running_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """Minutes of real processes: behind the marker (`pytest -m slow`)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a drill of real processes: run it with -m slow")


def test_the_cluster_shop_runs_behind_haproxy() -> None:
    haproxy_binary()
    with running_cluster(nats_cluster=True) as topology:
        create_database_on_primary(topology, SHOP_DATABASE)
        upgrade(SCRIPT_LOCATION, topology.database_url(database=SHOP_DATABASE))
        url = start_shop(topology, api_instances=2, balance="roundrobin")
        try:
            fleet = shop_fleet(topology)
            assert fleet is not None
            assert url == fleet.url
            for _ in range(10):
                assert httpx.get(f"{url}/v1/products", params={"limit": 1}, timeout=10).status_code == 200
            assert sorted(fleet.haproxy.request_counts().values()) == [5, 5]
            env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"COLUMNS": "160"}
            status = subprocess.run(
                [sys.executable, "-m", "mercato.cli.main", "cluster", "status", "--root", str(topology.root)],
                capture_output=True, text=True, timeout=60, env=env, check=True,
            )  # fmt: skip
            assert "HAProxy" in status.stdout
            assert status.stdout.count(" UP ") >= 2
        finally:
            stop_shop(topology)
