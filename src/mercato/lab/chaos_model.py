"""The checkout chaos run's configuration (faults, kills, timeouts, the bound every checkout must end
within) and its report (counts and one verdict per invariant)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercato.lab.chaos_invariants import (
    Verdict,
)

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SHOP_SECRET = "chaos-run-secret-that-is-long-enough-0123456789"  # noqa: S105 - a throwaway test shop's key
CUSTOMER_PASSWORD = "chaos-customer-password-1"  # noqa: S105 - throwaway accounts of a throwaway database
TERMINAL = ("completed", "compensated", "failed")

Log = Callable[[str], None]


@dataclass(frozen=True)
class ChaosConfig:
    checkouts: int = 50
    kills: int = 5
    # "sqlite" | "postgresql"; `database_url` overrides: a PostgreSQL server URL (a fresh database
    # is created on it and dropped afterwards) or a SQLite URL used as is (it should be new).
    backend: str = "sqlite"
    database_url: str | None = None
    concurrency: int = 8
    skus: int = 6
    # Below the expected demand, so some checkouts are cancelled for want of stock.
    stock_per_sku: int = 15
    max_lines: int = 2
    max_quantity: int = 2
    # Share of checkouts paying with the PSP's always-declined test card.
    decline_share: float = 0.05
    # Share of answered checkouts re-sent with the same key (a client that lost the 202).
    resend_share: float = 0.1
    psp_error_rate: float = 0.30
    psp_hang_rate: float = 0.10
    psp_lost_response_rate: float = 0.05
    carrier_error_rate: float = 0.10
    # Short timeouts and deadline so a hang costs half a second and a run finishes quickly.
    provider_timeout_s: float = 0.5
    provider_attempts: int = 4
    saga_deadline_s: float = 30.0
    saga_lease_s: float = 2.0
    # Checkout arrivals are spread over at least this long, so kills land among running sagas.
    drive_s: float = 15.0
    kill_gap_s: tuple[float, float] = (1.0, 3.0)
    # How long the worker stays dead before its restart.
    down_s: tuple[float, float] = (0.0, 1.0)
    seed: int = 7
    workdir: Path | None = None
    pg_admin_dsn: str = PG_ADMIN_DSN
    # The created database's name starts with this (sessions sharing one server keep their own).
    database_prefix: str = "mercato_chaos"

    @property
    def bound_s(self) -> float:
        """Start to terminal: the deadline, then the compensations (retried through the same
        faults) and a lease or two lost to kills."""
        return self.saga_deadline_s + 30.0 + 4 * self.saga_lease_s

    @property
    def settle_timeout_s(self) -> float:
        return self.bound_s + 40.0


@dataclass
class ChaosReport:
    backend: str
    checkouts: int
    kills: int
    duration_s: float
    settled: bool
    verdicts: list[Verdict]
    counts: dict[str, int]
    workdir: str
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.settled and all(v.ok for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "ok": self.ok,
            "checkouts": self.checkouts,
            "kills": self.kills,
            "duration_s": round(self.duration_s, 1),
            "settled": self.settled,
            "counts": self.counts,
            "invariants": [
                {
                    "name": v.name,
                    "ok": v.ok,
                    "checked": v.checked,
                    "violations": v.violations,
                    "details": v.details,
                }
                for v in self.verdicts
            ],
        }
