"""Named dependency checks run concurrently, each inside its own timeout.

Liveness touches nothing outside the process. Readiness runs every registered dependency check.
Startup reports the one-time initialisation steps (migrations, seed) as they complete.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Check = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    duration_ms: float
    error: str = ""


class HealthRegistry:
    def __init__(self, *, timeout_s: float = 2.0) -> None:
        self._timeout_s = timeout_s
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
        except Exception as exc:  # noqa: BLE001 - a probe reports any failure, it never raises
            return CheckResult(name, False, _ms(start), type(exc).__name__)
        return CheckResult(name, True, _ms(start))


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
