"""Hedged requests: after the dependency's usual latency, send a backup and keep the first success."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from mercato.kit.resilience.budget import RetryBudget
from mercato.kit.resilience.hooks import RetryHooks
from mercato.kit.resilience.latency import LatencyTracker

__all__ = ["hedge_delay_s", "hedged"]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def hedge_delay_s(
    *, tracker: LatencyTracker | None, quantile: float = 0.95, fallback_delay_s: float | None = None
) -> float | None:
    """The tracker's `quantile` once it has enough samples, else `fallback_delay_s` (None: don't hedge)."""
    if tracker is not None:
        observed = tracker.quantile(quantile)
        if observed is not None:
            return observed
    return fallback_delay_s


async def hedged(
    call: Callable[[], Awaitable[T]],
    *,
    idempotent: bool,
    delay_s: float | None = None,
    tracker: LatencyTracker | None = None,
    quantile: float = 0.95,
    max_hedges: int = 1,
    budget: RetryBudget | None = None,
    name: str = "",
    hooks: Sequence[RetryHooks] = (),
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Start `call()`; if no copy has succeeded after the hedge delay, start another (up to `max_hedges`).

    The delay is the tracker's observed `quantile` (p95 by default; "send a backup after T p95", guide
    §1) or `delay_s` while the tracker is cold. With a p95 delay, about 5 % of calls send one extra
    request, and those are exactly the calls in the tail. The first copy to *succeed* wins and the
    others are cancelled (and awaited, so nothing outlives this call); a copy that fails does not end
    the race while another is in flight; when every copy has failed the first error is raised.

    Only idempotent calls are hedged (two copies may both reach the dependency), and each backup
    withdraws a token from `budget` like a retry: a hedge is an extra attempt, and under an outage
    it must not double the load. The caller deposits the first attempt (the retry layer does).
    """
    wait_s = hedge_delay_s(tracker=tracker, quantile=quantile, fallback_delay_s=delay_s)
    if not idempotent or max_hedges < 1 or wait_s is None:
        return await call()
    copies: list[asyncio.Task[T]] = [asyncio.ensure_future(call())]
    in_flight: set[asyncio.Task[T]] = set(copies)
    errors: list[BaseException] = []
    hedges = 0
    timer: asyncio.Future[None] | None = asyncio.ensure_future(sleep(wait_s))
    try:
        while True:
            waiting: set[asyncio.Future[Any]] = set(in_flight)
            if timer is not None:
                waiting.add(timer)
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for copy in copies:
                if copy in done:
                    in_flight.discard(copy)
                    error = asyncio.CancelledError() if copy.cancelled() else copy.exception()
                    if error is None:
                        return copy.result()
                    errors.append(error)
            if timer is not None and timer in done:
                timer = None
                if budget is None or budget.try_withdraw():
                    hedges += 1
                    for hook in hooks:
                        hook.on_hedge(name)
                    backup = asyncio.ensure_future(call())
                    copies.append(backup)
                    in_flight.add(backup)
                    if hedges < max_hedges:
                        timer = asyncio.ensure_future(sleep(wait_s))
                else:
                    for hook in hooks:
                        hook.on_retry_denied(name, reason="budget")
            if not in_flight:
                raise errors[0]
    finally:
        leftovers: list[asyncio.Future[Any]] = [copy for copy in copies if not copy.done()]
        if timer is not None:
            leftovers.append(timer)
        for future in leftovers:
            future.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)
