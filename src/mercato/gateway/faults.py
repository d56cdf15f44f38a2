"""A latency fault switch for labs: every request except the probes and metrics waits
`MERCATO_HTTP_FAULT_DELAY_MS` before it is handled, as if this instance sat on a slow disk or a
noisy neighbour. Off (0) by default, refused outside dev/test (`Settings.check_safe_to_start`).
`mercato lab balancing` makes one of four instances slow with it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.types import ASGIApp

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

__all__ = ["LatencyFault"]

EXEMPT = ("/healthz", "/readyz", "/startupz", "/metrics")


class LatencyFault:
    """Edge step: waits `delay_s` before the request is handled (probes and metrics excepted)."""

    def __init__(self, *, delay_s: float) -> None:
        self.delay_s = delay_s

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        if ex.path not in EXEMPT:
            await asyncio.sleep(self.delay_s)
        return None
