"""The shop's own processes on the cluster: `mercato api` and one `mercato worker`, pointed at
the three PostgreSQL nodes (multi-host, read-write), the replicas and the NATS cluster. Started by
`mercato cluster up --shop`, stopped first by `down`.

With `api_instances > 1` (`--api-instances N`) the API runs as N processes behind HAProxy
(`cluster/fleet.py`, in `shop/apis/`): the shop's URL is then HAProxy's frontend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from mercato.cluster.fleet import ApiFleet
from mercato.cluster.haproxy import HAProxySettings
from mercato.cluster.processes import spawn, stop, wait_until
from mercato.cluster.topology import Topology
from mercato.kit.ports import free_port

SHOP_DATABASE = "mercato"


def shop_env(topology: Topology) -> dict[str, str]:
    """The MERCATO_* settings that point the shop at this cluster."""
    return {
        "MERCATO_DATABASE_URL": topology.database_url(database=SHOP_DATABASE),
        "MERCATO_DATABASE_REPLICA_URLS": ",".join(
            topology.node_url(n, database=SHOP_DATABASE) for n in topology.postgres
        ),
        "MERCATO_MESSAGING_BACKEND": "nats",
        "MERCATO_MESSAGING_NATS_URL": ",".join(topology.nats_urls),
        "MERCATO_MESSAGING_NATS_REPLICAS": "3",
    }


def fleet_folder(topology: Topology) -> Path:
    return topology.dir("shop", "apis")


def shop_fleet(topology: Topology) -> ApiFleet | None:
    """The balanced API fleet of this cluster, if `up` started one."""
    folder = fleet_folder(topology)
    return ApiFleet.load(folder) if ApiFleet.exists(folder) else None


def start_shop(
    topology: Topology,
    *,
    timeout_s: float = 90.0,
    api_instances: int = 1,
    balance: str | None = None,
) -> str:
    """Start the API and the worker; return the API's URL once it answers /readyz. With
    `api_instances > 1` or a `balance` algorithm, N API processes behind HAProxy."""
    folder = topology.dir("shop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(shop_env(topology), MERCATO_DATA_DIR=str(folder))
    mercato = [sys.executable, "-m", "mercato.cli.main"]
    if api_instances > 1 or balance is not None:
        fleet = ApiFleet(
            fleet_folder(topology),
            instances=api_instances,
            env=shop_env(topology),
            settings=HAProxySettings(balance=balance or "leastconn"),
        )
        url = fleet.start(timeout_s=timeout_s)
        spawn(folder, "worker", [*mercato, "worker"], env=env)
        (folder / "api.url").write_text(url)
        return url
    port = free_port()
    spawn(
        folder,
        "api",
        [*mercato, "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
    )
    spawn(folder, "worker", [*mercato, "worker"], env=env)
    (folder / "api.url").write_text(f"http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200

    if not wait_until(ready, timeout_s=timeout_s, interval_s=0.5):
        raise RuntimeError(f"the API did not become ready; see {folder}/api.log")
    return url


def shop_url(topology: Topology) -> str | None:
    path = topology.dir("shop", "api.url")
    return path.read_text().strip() if path.exists() else None


def stop_shop(topology: Topology) -> None:
    fleet = shop_fleet(topology)
    if fleet is not None:
        fleet.stop()
    for name in ("api", "worker"):
        stop(topology.dir("shop"), name)
