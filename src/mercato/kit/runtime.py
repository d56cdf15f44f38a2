"""Process-level settings for the long-running services (`mercato api|worker|up`, the simulators)."""

from __future__ import annotations

import gc

__all__ = ["tune_gc_for_service"]

# Collections of the youngest generation every 50,000 net allocations instead of 700: a service
# allocates millions of short-lived objects per second of load (rows, requests, coroutines), and at
# the default each request paid for several collections that found almost nothing to free.
_GEN0_THRESHOLD = 50_000


def tune_gc_for_service() -> None:
    """Freeze what start-up allocated (modules, compiled statements, settings: never garbage) so
    the cycle collector stops re-scanning it, and collect the young generation less often.
    Measured in the checkout bench: the collector's share of a worker's CPU fell from ~5 %."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GEN0_THRESHOLD, gen1, gen2)
