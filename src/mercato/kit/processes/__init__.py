"""CPU-heavy work in worker processes, awaited from asyncio, behind a bounded queue (ADR 0053)."""

from mercato.kit.processes.pool import PoolFull, ProcessPool, WorkerCrashed

__all__ = ["PoolFull", "ProcessPool", "WorkerCrashed"]
