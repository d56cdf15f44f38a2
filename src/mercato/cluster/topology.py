"""Where every process of the local cluster lives: ports, folders, and the file that remembers them.

`mercato cluster up` picks free 127.0.0.1 ports once and writes them to `<root>/topology.json`, so
`status` and `down` (and the labs) find the same processes later. Nothing here starts anything.
The shared servers of the machine (5432, 6379, 4222, 2379) are never chosen: the kernel hands out
ephemeral ports, and a port on the reserved list is skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mercato.kit.ports import free_port

TOPOLOGY_FILE = "topology.json"


@dataclass(frozen=True)
class EtcdMember:
    name: str
    client_port: int
    peer_port: int

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass(frozen=True)
class PostgresNode:
    name: str
    pg_port: int
    rest_port: int

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"


@dataclass(frozen=True)
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    monitor_port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


@dataclass(frozen=True)
class Topology:
    """The cluster's shape. `scope` names the Patroni cluster (its keys in etcd)."""

    root: Path
    scope: str
    synchronous_mode: bool
    etcd: tuple[EtcdMember, ...]
    postgres: tuple[PostgresNode, ...]
    nats: tuple[NatsNode, ...]
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def plan(
        cls,
        root: Path,
        *,
        members: int = 3,
        synchronous_mode: bool = True,
        scope: str = "mercato",
    ) -> Topology:
        taken: set[int] = set()
        return cls(
            root=root.resolve(),
            scope=scope,
            synchronous_mode=synchronous_mode,
            etcd=tuple(
                EtcdMember(f"etcd{i}", free_port(taken=taken), free_port(taken=taken)) for i in range(members)
            ),
            postgres=tuple(
                PostgresNode(f"pg{i}", free_port(taken=taken), free_port(taken=taken)) for i in range(members)
            ),
            nats=tuple(
                NatsNode(f"nats{i}", free_port(taken=taken), free_port(taken=taken), free_port(taken=taken))
                for i in range(members)
            ),
        )

    # -- folders -------------------------------------------------------------------------------

    def dir(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{m.client_port}" for m in self.etcd)

    @property
    def nats_urls(self) -> list[str]:
        return [n.url for n in self.nats]

    def database_url(self, *, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        """One URL naming every node; libpq-style multi-host with `target_session_attrs=read-write`
        makes the client try each host until it finds the one accepting writes (the primary)."""
        if "+" not in driver:  # a libpq/asyncpg DSN: the comma-separated host list
            hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.postgres)
            return f"{driver}://postgres@{hosts}/{database}?target_session_attrs=read-write"
        # SQLAlchemy's form: one `host=` query parameter per node.
        hosts = "&".join(f"host=127.0.0.1:{n.pg_port}" for n in self.postgres)
        return f"{driver}://postgres@/{database}?{hosts}&target_session_attrs=read-write"

    def node_url(
        self, node: PostgresNode, *, database: str = "postgres", driver: str = "postgresql+asyncpg"
    ) -> str:
        return f"{driver}://postgres@127.0.0.1:{node.pg_port}/{database}"

    # -- persistence ---------------------------------------------------------------------------

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["root"] = str(self.root)
        tmp = self.root / (TOPOLOGY_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.root / TOPOLOGY_FILE)

    @classmethod
    def load(cls, root: Path) -> Topology:
        path = root / TOPOLOGY_FILE
        if not path.exists():
            raise FileNotFoundError(f"no cluster at {root} (no {TOPOLOGY_FILE}): run `mercato cluster up`")
        data = json.loads(path.read_text())
        return cls(
            root=Path(data["root"]),
            scope=data["scope"],
            synchronous_mode=bool(data["synchronous_mode"]),
            etcd=tuple(EtcdMember(**m) for m in data["etcd"]),
            postgres=tuple(PostgresNode(**n) for n in data["postgres"]),
            nats=tuple(NatsNode(**n) for n in data["nats"]),
            extra=dict(data.get("extra", {})),
        )
