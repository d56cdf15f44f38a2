"""The worker's election, chosen by configuration (ADR 0041; `MERCATO_COORDINATION_*`).

`auto`: etcd when `MERCATO_COORDINATION_ETCD_ENDPOINTS` is set (distributed mode); else database
leases when the database is PostgreSQL (several workers may share it); else local (embedded SQLite,
one process). Whichever is chosen, a new term first claims its token at the database, so from
that moment a stale leader's writes are refused.
"""

from __future__ import annotations

import os
import socket

from prometheus_client import CollectorRegistry

from mercato.bootstrap import Container
from mercato.kit.coordination import (
    Election,
    LeaseElection,
    LeaseStore,
    LocalElection,
    PrometheusElectionHook,
    Term,
    claim,
)

__all__ = ["build_election", "election_kind"]


def election_kind(container: Container) -> str:
    settings = container.settings.coordination
    if settings.election != "auto":
        return settings.election
    if settings.etcd_endpoints.strip():
        return "etcd"
    return "database" if container.db.dialect == "postgresql" else "local"


def build_election(
    container: Container, registry: CollectorRegistry, *, holder: str | None = None
) -> Election:
    settings = container.settings.coordination
    name = settings.election_name
    hook = PrometheusElectionHook(registry, election=name)
    holder = holder or f"{socket.gethostname()}:{os.getpid()}"

    async def on_elected(term: Term) -> None:
        if term.token is not None:
            await claim(container.db, name, term.token)

    kind = election_kind(container)
    if kind == "local":
        return LocalElection(name, holder, hook=hook)
    if kind == "database":
        return LeaseElection(
            LeaseStore(container.db, container.clock),
            name,
            holder,
            ttl_s=settings.lease_ttl_s,
            hook=hook,
            on_elected=on_elected,
        )
    from mercato.kit.coordination.etcd import EtcdElection, parse_endpoints  # grpc only when used

    return EtcdElection(
        parse_endpoints(settings.etcd_endpoints),
        name,
        holder,
        ttl_s=settings.lease_ttl_s,
        hook=hook,
        on_elected=on_elected,
    )
