"""Leader election and fencing: at most one leader at a time, and a stale leader cannot write.

`Election` is the port (etcd in distributed mode, database leases when several processes share a
database without etcd, local in embedded mode); `fenced_writes` makes the database refuse a write
transaction whose term is older than the newest it has seen (ADR 0041)."""

from mercato.kit.coordination.election import (
    Election,
    ElectionHook,
    LeaseElection,
    LocalElection,
    PrometheusElectionHook,
    Term,
)
from mercato.kit.coordination.fencing import (
    FencedOut,
    claim,
    fence,
    fenced_writes,
    fencing_tokens_table,
    newest_token,
)
from mercato.kit.coordination.leases import Lease, LeaseLost, LeaseStore, leases_table

__all__ = [
    "Election",
    "ElectionHook",
    "FencedOut",
    "Lease",
    "LeaseElection",
    "LeaseLost",
    "LeaseStore",
    "LocalElection",
    "PrometheusElectionHook",
    "Term",
    "claim",
    "fence",
    "fenced_writes",
    "fencing_tokens_table",
    "leases_table",
    "newest_token",
]
