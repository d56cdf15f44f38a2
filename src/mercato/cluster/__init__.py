"""Local servers for labs and tests, never production: real engines on free loopback ports.

- `PostgresNode` / `RedisNode`: one private PostgreSQL cluster or redis-server (init, start, stop, kill -9,
  restart), owning a temporary folder; fault tests stop and kill them to see what the shop does while a
  dependency is down.
- `cluster_up` / `cluster_down` / `cluster_status` (`mercato cluster`): a local high-availability topology —
  a 3-member etcd, three PostgreSQL 15 nodes under Patroni (one primary, two streaming replicas with
  replication slots, optional synchronous mode) and a 3-node NATS JetStream cluster, each process on free
  127.0.0.1 ports under one folder (`topology.json` there says what runs where).
- `HAProxy` (`cluster/haproxy.py`): HAProxy in front of N HTTP backends, config generated (health checks
  on /readyz, slow start), driven through its runtime API (weights, drain, maintenance, stats).

Nothing here imports the shop: the shop's processes are started as commands (`cluster/shop.py`).
"""

from mercato.cluster.haproxy import Backend, HAProxy, HAProxySettings
from mercato.cluster.lifecycle import PROBE_STREAM, cluster_down, cluster_up
from mercato.cluster.postgres import PostgresNode
from mercato.cluster.redis import RedisNode
from mercato.cluster.status import ClusterStatus, NodeStatus, cluster_status
from mercato.cluster.topology import Topology
from mercato.kit.ports import free_port

__all__ = [
    "PROBE_STREAM",
    "Backend",
    "ClusterStatus",
    "HAProxy",
    "HAProxySettings",
    "NodeStatus",
    "PostgresNode",
    "RedisNode",
    "Topology",
    "cluster_down",
    "cluster_status",
    "cluster_up",
    "free_port",
]
