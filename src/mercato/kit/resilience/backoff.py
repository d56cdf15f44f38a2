"""Exponential backoff with full jitter."""

from __future__ import annotations

from random import Random

__all__ = ["full_jitter_backoff_s"]

# 2**64 times any sane base is far above any cap; bounding the exponent avoids float overflow.
_MAX_EXPONENT = 64


def full_jitter_backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: Random) -> float:
    """The pause before retry number `attempt + 1` (attempt counts from 0).

    AWS "Exponential Backoff And Jitter", full jitter::

        sleep = uniform(0, min(cap_s, base_s * 2**attempt))

    Full jitter spreads synchronized clients evenly over the whole interval, which is what breaks up a
    thundering herd of retries after a shared failure; it does the least total work of the AWS variants.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling_s = min(cap_s, base_s * 2.0 ** min(attempt, _MAX_EXPONENT))
    return rng.uniform(0.0, max(0.0, ceiling_s))
