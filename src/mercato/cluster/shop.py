"""The shop's own processes on the cluster: one `mercato api` and one `mercato worker`, pointed at
the three PostgreSQL nodes (multi-host, read-write), the replicas and the NATS cluster. Started by
`mercato cluster up --shop`, stopped first by `down`."""

from __future__ import annotations

import os
import sys

import httpx

from mercato.cluster.processes import spawn, stop, wait_until
from mercato.cluster.topology import Topology, free_port

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


def start_shop(topology: Topology, *, timeout_s: float = 90.0) -> str:
    """Start the API and the worker; return the API's URL once it answers /readyz."""
    folder = topology.dir("shop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(shop_env(topology), MERCATO_DATA_DIR=str(folder))
    port = free_port()
    mercato = [sys.executable, "-m", "mercato.cli.main"]
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
    for name in ("api", "worker"):
        stop(topology.dir("shop"), name)
