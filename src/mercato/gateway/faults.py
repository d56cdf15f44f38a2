"""A latency fault switch for labs: every request except the probes and metrics waits
`MERCATO_HTTP_FAULT_DELAY_MS` before it is handled, as if this instance sat on a slow disk or a
noisy neighbour. Off (0) by default, refused outside dev/test (`Settings.check_safe_to_start`).
`mercato lab balancing` makes one of four instances slow with it."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["LatencyFaultMiddleware"]

EXEMPT = ("/healthz", "/readyz", "/startupz", "/metrics")


class LatencyFaultMiddleware:
    def __init__(self, app: ASGIApp, *, delay_s: float) -> None:
        self.app = app
        self.delay_s = delay_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in EXEMPT:
            await asyncio.sleep(self.delay_s)
        await self.app(scope, receive, send)
