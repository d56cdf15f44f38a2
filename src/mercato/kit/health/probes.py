"""Named dependency checks run concurrently, each inside its own timeout.

Liveness touches nothing outside the process. Readiness runs every registered dependency check.
Startup reports the one-time initialisation steps (migrations, seed) as they complete.

A check ends one of three ways: it returns (ok), it raises `Degraded` (the dependency is down but the
request path does without it: a fail-open rate limiter, say), or it raises anything else (failed).
Only a failed check makes the node unready: a load balancer that pulled a node for a dependency every
node shares and none needs would take healthy capacity away for nothing (ADR 0026).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mercato.kit.health.drain import Drain
from mercato.kit.storage.outages import classify_outage

__all__ = ["CheckResult", "Degraded", "HealthRegistry", "overall_status"]

Check = Callable[[], Awaitable[None]]


class Degraded(Exception):
    """Raised by a check whose dependency is down while the request path carries on without it."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    duration_ms: float
    error: str = ""
    degraded: bool = False

    @property
    def status(self) -> str:
        """`ok`, `degraded` (down, but failing open: still ready) or `failed`."""
        if not self.ok:
            return "failed"
        return "degraded" if self.degraded else "ok"


def overall_status(results: Sequence[CheckResult]) -> str:
    """`unavailable` if any check failed, else `degraded` if any is, else `ok`."""
    if any(not r.ok for r in results):
        return "unavailable"
    return "degraded" if any(r.degraded for r in results) else "ok"


class HealthRegistry:
    def __init__(self, *, timeout_s: float = 2.0, drain: Drain | None = None) -> None:
        self._timeout_s = timeout_s
        # Set on SIGTERM: readiness answers `draining` (503) while in-flight work finishes (ADR 0040).
        self.drain = drain or Drain()
        self._checks: dict[str, Check] = {}
        self._startup: dict[str, bool] = {}

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def expect_startup_step(self, name: str) -> None:
        self._startup.setdefault(name, False)

    def mark_started(self, name: str) -> None:
        self._startup[name] = True

    @property
    def startup_steps(self) -> dict[str, bool]:
        return dict(self._startup)

    @property
    def draining(self) -> bool:
        return self.drain.active

    @property
    def started(self) -> bool:
        return all(self._startup.values())

    async def readiness(self) -> list[CheckResult]:
        return list(await asyncio.gather(*(self._run(n, c) for n, c in self._checks.items())))

    async def _run(self, name: str, check: Check) -> CheckResult:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(check(), timeout=self._timeout_s)
        except TimeoutError:
            return CheckResult(name, False, _ms(start), f"timed out after {self._timeout_s}s")
        except Degraded as exc:
            return CheckResult(name, True, _ms(start), str(exc), degraded=True)
        except Exception as exc:  # noqa: BLE001 - a probe reports any failure, it never raises
            return CheckResult(name, False, _ms(start), _describe(exc))
        return CheckResult(name, True, _ms(start))


def _describe(exc: Exception) -> str:
    """What failed, without hosts or driver messages: the outage's dependency and reason when known."""
    outage = classify_outage(exc)
    if outage is not None:
        return f"{outage.dependency} unavailable ({outage.reason})"
    message = str(exc)
    # Our own checks raise messages written for operators (no secrets); anything else: its type only.
    if type(exc).__module__.startswith("mercato.") and message:
        return message
    return type(exc).__name__


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
