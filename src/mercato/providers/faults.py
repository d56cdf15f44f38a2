"""Fault settings and the pure decision of which fault one request suffers.

The simulators exist so the shop's resilience code meets the failures real providers produce: slow
answers with a long tail, errors, requests that never get an answer, outages, and the nastiest one,
an operation that succeeded while its response was lost. `FaultInjector.decide()` draws all of that
from a seeded `Random` and an injectable `Clock`, so a test can replay the exact same fault sequence.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mercato.kit.clock import Clock, SystemClock

__all__ = [
    "Z_99",
    "FaultDecision",
    "FaultInjector",
    "FaultKind",
    "FaultSettings",
    "OutageWindow",
    "lognormal_params",
]

# The standard normal's 0.99 quantile: a lognormal's p99 sits Z_99 standard deviations (in log space)
# above its median.
Z_99 = 2.3263478740408408


class FaultKind(StrEnum):
    NONE = "none"
    ERROR = "error"
    HANG = "hang"
    LOST_RESPONSE = "lost_response"
    OUTAGE = "outage"


class OutageWindow(BaseModel):
    """`[start_s, end_s)` in seconds after the settings were applied.

    `mode="error"` answers every business request 503 at once (a provider that is down and says so);
    `mode="hang"` never answers them (a provider that is down and does not say so: the client pays its
    whole timeout), which is the outage a circuit breaker's fail-fast exists for.
    """

    model_config = ConfigDict(extra="forbid")

    start_s: float = Field(ge=0)
    end_s: float = Field(gt=0)
    mode: Literal["error", "hang"] = "error"

    @model_validator(mode="after")
    def _ordered(self) -> OutageWindow:
        if self.end_s <= self.start_s:
            raise ValueError("end_s must be after start_s")
        return self

    def contains(self, elapsed_s: float) -> bool:
        return self.start_s <= elapsed_s < self.end_s


class FaultSettings(BaseModel):
    """What can go wrong with a simulated provider, changeable at runtime.

    Rates are probabilities per business request and are drawn from one uniform number, so they are
    mutually exclusive and must sum to at most 1. Latency is lognormal, fixed by two quantiles:
    `mu = ln(p50)`, `sigma = (ln(p99) - ln(p50)) / 2.3263` (2.3263 is the standard normal's 0.99
    quantile); `p50_ms == p99_ms` gives a constant delay and `p50_ms == 0` none at all.
    """

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(default=0.0, ge=0, le=1, description="Share answered 500 or 503.")
    hang_rate: float = Field(default=0.0, ge=0, le=1, description="Share never answered.")
    lost_response_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share applied and committed, then dropped without a response."
    )
    latency_p50_ms: float = Field(default=0.0, ge=0, le=600_000)
    latency_p99_ms: float = Field(default=0.0, ge=0, le=600_000)
    read_latency_p50_ms: float = Field(
        default=0.0, ge=0, le=600_000, description="Median latency added to record lookups (GET /v1/...)."
    )
    read_latency_p99_ms: float = Field(
        default=0.0, ge=0, le=600_000, description="Their 99th percentile (lognormal tail)."
    )
    outages: list[OutageWindow] = Field(
        default_factory=list, description="Windows `[start_s, end_s)` after the settings were applied."
    )
    outage_for_s: float | None = Field(
        default=None, gt=0, description="Convenience: an outage from now for this many seconds."
    )
    hang_max_s: float = Field(
        default=3600.0, gt=0, le=86_400, description="A hang ends (connection dropped) after this long."
    )
    seed: int | None = Field(default=None, description="Seed for the fault draws; none = unpredictable.")

    @model_validator(mode="after")
    def _consistent(self) -> FaultSettings:
        if self.error_rate + self.hang_rate + self.lost_response_rate > 1.0 + 1e-9:
            raise ValueError("error_rate + hang_rate + lost_response_rate must be at most 1")
        if self.latency_p50_ms == 0 and self.latency_p99_ms > 0:
            raise ValueError("latency_p99_ms needs latency_p50_ms > 0")
        if self.latency_p50_ms > 0 and self.latency_p99_ms < self.latency_p50_ms:
            raise ValueError("latency_p99_ms must be at least latency_p50_ms")
        if self.read_latency_p50_ms == 0 and self.read_latency_p99_ms > 0:
            raise ValueError("read_latency_p99_ms needs read_latency_p50_ms > 0")
        if self.read_latency_p50_ms > 0 and self.read_latency_p99_ms < self.read_latency_p50_ms:
            raise ValueError("read_latency_p99_ms must be at least read_latency_p50_ms")
        return self

    def windows(self) -> list[OutageWindow]:
        extra = [OutageWindow(start_s=0.0, end_s=self.outage_for_s)] if self.outage_for_s else []
        return [*self.outages, *extra]


def lognormal_params(p50_ms: float, p99_ms: float) -> tuple[float, float]:
    """`(mu, sigma)` of the lognormal (in milliseconds) with median `p50_ms` and 0.99 quantile `p99_ms`.

    A lognormal's quantile q is `exp(mu + sigma * z_q)`; the median has `z = 0`, so `mu = ln p50`, and
    `sigma = (ln p99 - ln p50) / z_0.99`.
    """
    if p50_ms <= 0:
        raise ValueError("p50_ms must be positive")
    p99 = max(p99_ms, p50_ms)
    return math.log(p50_ms), (math.log(p99) - math.log(p50_ms)) / Z_99


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """The fault one request suffers: its kind, the status for errors, and the latency to add first."""

    kind: FaultKind
    latency_s: float = 0.0
    status: int | None = None
    retry_after_s: int | None = None

    @property
    def responds(self) -> bool:
        """Whether the client will see a response at all."""
        return self.kind not in (FaultKind.HANG, FaultKind.LOST_RESPONSE)


_ERROR_STATUSES = (500, 503)


class FaultInjector:
    """Draws a `FaultDecision` per request from the current settings, a seeded `Random` and a `Clock`.

    Outage windows are measured from the moment the settings were applied (`update`), on the clock's
    monotonic time, so "down for the next 30 s" means the same thing whenever it is set.

    Record lookups draw their latency from a second `Random` (seeded from `seed` too), so a test that
    replays the reads' draws is not disturbed by the writes' and the other way round.
    """

    def __init__(
        self,
        settings: FaultSettings | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random(settings.seed if settings else None)
        self._read_rng = random.Random(_read_seed(settings.seed if settings else None))
        self._settings = FaultSettings()
        self._applied_at = self.clock.monotonic()
        self._mu_sigma: tuple[float, float] | None = None
        self._read_mu_sigma: tuple[float, float] | None = None
        self.update(settings or FaultSettings(), reseed=False)

    @property
    def settings(self) -> FaultSettings:
        return self._settings

    def update(self, settings: FaultSettings, *, reseed: bool = True) -> None:
        """Apply new settings; outage windows restart from now, and a given seed restarts the draws."""
        self._settings = settings
        self._applied_at = self.clock.monotonic()
        self._mu_sigma = (
            lognormal_params(settings.latency_p50_ms, settings.latency_p99_ms)
            if settings.latency_p50_ms > 0
            else None
        )
        self._read_mu_sigma = (
            lognormal_params(settings.read_latency_p50_ms, settings.read_latency_p99_ms)
            if settings.read_latency_p50_ms > 0
            else None
        )
        if reseed and settings.seed is not None:
            self._rng.seed(settings.seed)
            self._read_rng.seed(_read_seed(settings.seed))

    def elapsed_s(self) -> float:
        return self.clock.monotonic() - self._applied_at

    def current_outage(self) -> OutageWindow | None:
        """The outage in progress (the one ending last when windows overlap), or None."""
        elapsed = self.elapsed_s()
        active = [w for w in self._settings.windows() if w.contains(elapsed)]
        return max(active, key=lambda w: w.end_s, default=None)

    def outage_remaining_s(self) -> float:
        """Seconds until the current outage ends (0 when none is in progress)."""
        window = self.current_outage()
        return 0.0 if window is None else window.end_s - self.elapsed_s()

    def sample_latency_s(self) -> float:
        if self._mu_sigma is None:
            return 0.0
        mu, sigma = self._mu_sigma
        return self._rng.lognormvariate(mu, sigma) / 1000.0

    def sample_read_latency_s(self) -> float:
        """The latency one record lookup suffers (0 unless `read_latency_p50_ms` is set)."""
        if self._read_mu_sigma is None:
            return 0.0
        mu, sigma = self._read_mu_sigma
        return self._read_rng.lognormvariate(mu, sigma) / 1000.0

    def decide(self) -> FaultDecision:
        """The fault for one request. An outage wins over everything and costs no latency draw."""
        window = self.current_outage()
        if window is not None and window.mode == "hang":
            return FaultDecision(kind=FaultKind.HANG)
        remaining = self.outage_remaining_s()
        if remaining > 0:
            return FaultDecision(
                kind=FaultKind.OUTAGE, status=503, retry_after_s=max(1, math.ceil(remaining))
            )
        settings = self._settings
        latency_s = self.sample_latency_s()
        draw = self._rng.random()
        if draw < settings.error_rate:
            status = self._rng.choice(_ERROR_STATUSES)
            return FaultDecision(
                kind=FaultKind.ERROR,
                latency_s=latency_s,
                status=status,
                retry_after_s=1 if status == 503 else None,
            )
        draw -= settings.error_rate
        if draw < settings.hang_rate:
            return FaultDecision(kind=FaultKind.HANG, latency_s=latency_s)
        draw -= settings.hang_rate
        if draw < settings.lost_response_rate:
            return FaultDecision(kind=FaultKind.LOST_RESPONSE, latency_s=latency_s)
        return FaultDecision(kind=FaultKind.NONE, latency_s=latency_s)


def _read_seed(seed: int | None) -> str | None:
    return None if seed is None else f"reads-{seed}"
