"""ASGI middleware that puts the incoming request's deadline in force for the whole request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.resilience.deadline import DEADLINE_HEADER, Deadline, deadline_scope, parse_deadline_header

__all__ = ["DeadlineMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_HEADER_KEY = DEADLINE_HEADER.lower().encode("latin-1")


class DeadlineMiddleware:
    """Sets the request deadline from `X-Request-Deadline`, else `default_timeout_s` (if any).

    The caller's header is capped at `max_timeout_s`; our own default applies when the caller sent none.
    Pure ASGI (no framework import) so it sits anywhere in the chain and costs one header scan.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        default_timeout_s: float | None = None,
        max_timeout_s: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self._app = app
        self._default_timeout_s = default_timeout_s
        self._max_timeout_s = max_timeout_s
        self._clock: Clock = clock or SystemClock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        deadline: Deadline | None = None
        for key, value in scope.get("headers", ()):
            if key.lower() == _HEADER_KEY:
                deadline = parse_deadline_header(
                    value.decode("latin-1"), max_timeout_s=self._max_timeout_s, clock=self._clock
                )
                break
        if deadline is None and self._default_timeout_s is not None:
            deadline = Deadline.after(self._default_timeout_s, clock=self._clock)
        with deadline_scope(deadline=deadline):
            await self._app(scope, receive, send)
