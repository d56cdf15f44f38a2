"""Local server nodes for labs and fault tests: real servers on free loopback ports, never production.

`PostgresNode` is one private PostgreSQL cluster (initdb, start, stop, kill -9, restart); `RedisNode` one
private redis-server. Both own a temporary folder and remove it on `destroy()`; tests and labs stop, kill and
restart them to measure what the application does while a dependency is down. Kit-level only: nothing here
knows the shop.
"""

from mercato.cluster.ports import free_port
from mercato.cluster.postgres import PostgresNode
from mercato.cluster.redis import RedisNode

__all__ = ["PostgresNode", "RedisNode", "free_port"]
