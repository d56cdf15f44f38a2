"""Leases with fencing tokens: at most one holder at a time, and a stale holder cannot write."""

from mercato.kit.coordination.leases import Lease, LeaseLost, LeaseStore, leases_table

__all__ = ["Lease", "LeaseLost", "LeaseStore", "leases_table"]
