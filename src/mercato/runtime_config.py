"""The runtime configuration: which settings may change while processes run, and how they are checked.

The stored document (ADR 0045) is an *overlay* on the start-up settings: each section holds only the
fields it changes, and is validated by the very model that validates those settings at start
(`BackpressureSettings`, `EdgeCacheSettings`, ...), merged over this process's start-up values. An
unknown section or field, a value out of range, a rate-limit policy that breaks its schema or a flag
naming an unknown variant refuses the whole document (`ConfigInvalid`, every problem listed).

    {
      "ratelimit": {"policies": {"rules": [...]}},       # the TOML policy file's schema, as JSON
      "backpressure": {"max_inflight": 32},               # shedding limits
      "edge_cache": {"list_max_age_s": 5},                # Cache-Control lifetimes
      "cache": {"fresh_s": 60, "negative_s": 2},          # the application cache's TTLs
      "breakers": {"consecutive_failures": 4},            # the provider breakers' thresholds
      "provider_calls": {"max_attempts": 2},              # provider timeouts, retries, retry budget
      "discovery": {"psp": "http://127.0.0.1:8100"},      # provider endpoints (service discovery)
      "flags": {"catalog.search_v2": {...}}               # kit/flags FlagSpec per flag
    }

Settings not listed here (database URLs, pools, ports, secrets) need a restart: they are read once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mercato.config import BackpressureSettings, CacheSettings, EdgeCacheSettings, Settings
from mercato.kit.dynconfig import ConfigInvalid
from mercato.kit.flags import FlagSpec
from mercato.kit.ratelimit.policy import PolicyError, PolicySet, parse_policies
from mercato.kit.resilience.breaker import BreakerConfig

__all__ = ["SECTIONS", "BreakerThresholds", "RuntimeConfig", "parse_runtime"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerThresholds(_Strict):
    """What may change on every provider breaker at run time (the window's length may not)."""

    failure_rate_threshold: float | None = Field(default=None, gt=0, le=1)
    slow_call_rate_threshold: float | None = Field(default=None, gt=0, le=1)
    minimum_calls: int | None = Field(default=None, ge=1)
    consecutive_failures: int | None = Field(default=None, ge=0)
    wait_s: float | None = Field(default=None, ge=0)
    max_wait_s: float | None = Field(default=None, ge=0)
    half_open_probes: int | None = Field(default=None, ge=1, le=100)

    def apply(self, config: BreakerConfig) -> BreakerConfig:
        changes = {k: v for k, v in self.model_dump().items() if v is not None}
        return replace(config, **changes) if changes else config


class ProviderCallLimits(_Strict):
    """The provider calls' timeouts and retries (checkout's policies), changeable at run time. The
    whole call's budget may only shrink below the start-up `checkout.provider_timeout_s`: the saga
    step's timeout (built once) encloses it."""

    total_timeout_s: float | None = Field(default=None, gt=0, le=60)
    attempt_timeout_s: float | None = Field(default=None, gt=0, le=60)
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    retry_budget_ratio: float | None = Field(default=None, ge=0, le=1)


class Discovery(_Strict):
    """Provider endpoints. On one machine service discovery is this list; it comes from here."""

    psp: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/.*)?$")
    carrier: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/.*)?$")


class RateLimitRuntime(_Strict):
    policies: dict[str, Any]


class _Document(_Strict):
    ratelimit: RateLimitRuntime | None = None
    backpressure: dict[str, Any] = Field(default_factory=dict)
    edge_cache: dict[str, Any] = Field(default_factory=dict)
    cache: dict[str, Any] = Field(default_factory=dict)
    breakers: BreakerThresholds = BreakerThresholds()
    provider_calls: ProviderCallLimits = ProviderCallLimits()
    discovery: Discovery = Discovery()
    flags: dict[str, FlagSpec] = Field(default_factory=dict)


SECTIONS = tuple(_Document.model_fields)
# Only the cache's lifetimes may change at run time (its backend and sizes are built once).
_CACHE_RUNTIME_FIELDS = frozenset(
    {"fresh_s", "local_fresh_s", "stale_while_revalidate_s", "stale_if_error_s", "negative_s"}
)


@dataclass(frozen=True)
class RuntimeConfig:
    """The effective runtime settings of one configuration version."""

    backpressure: BackpressureSettings
    edge_cache: EdgeCacheSettings
    cache: CacheSettings
    breakers: BreakerThresholds = field(default_factory=BreakerThresholds)
    ratelimit_policies: PolicySet | None = None  # None: the policy file
    provider_calls: ProviderCallLimits = field(default_factory=ProviderCallLimits)
    discovery: Discovery = field(default_factory=Discovery)
    flags: dict[str, FlagSpec] = field(default_factory=dict)


def _errors(section: str, exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors():
        where = ".".join(str(part) for part in (section, *error["loc"]) if part != "")
        out.append(f"{where}: {error['msg']}")
    return out


def _overlay(section: str, model: type[BaseModel], base: BaseModel, changes: dict[str, Any]) -> Any:
    unknown = sorted(set(changes) - set(model.model_fields))
    if unknown:
        raise ConfigInvalid([f"{section}.{name}: no such setting" for name in unknown])
    try:
        return model.model_validate({**base.model_dump(), **changes})
    except ValidationError as exc:
        raise ConfigInvalid(_errors(section, exc)) from exc


def parse_runtime(document: dict[str, Any], *, base: Settings) -> RuntimeConfig:
    """Validate `document` over `base`; raises `ConfigInvalid` listing every problem found."""
    try:
        doc = _Document.model_validate(document)
    except ValidationError as exc:
        raise ConfigInvalid(_errors("", exc)) from exc
    fixed = sorted(set(doc.cache) - _CACHE_RUNTIME_FIELDS)
    if fixed:
        raise ConfigInvalid([f"cache.{name}: not changeable at run time (restart)" for name in fixed])
    budget_s = base.checkout.provider_timeout_s
    total_s = doc.provider_calls.total_timeout_s
    if total_s is not None and total_s > budget_s:
        raise ConfigInvalid(
            [f"provider_calls.total_timeout_s: {total_s} exceeds the saga step's budget {budget_s} (restart)"]
        )
    policies = None
    if doc.ratelimit is not None:
        try:
            policies = parse_policies(doc.ratelimit.policies, source="runtime configuration")
        except PolicyError as exc:
            raise ConfigInvalid([f"ratelimit.policies: {exc}"]) from exc
    return RuntimeConfig(
        backpressure=_overlay("backpressure", BackpressureSettings, base.backpressure, doc.backpressure),
        edge_cache=_overlay("edge_cache", EdgeCacheSettings, base.edge_cache, doc.edge_cache),
        cache=_overlay("cache", CacheSettings, base.cache, doc.cache),
        breakers=doc.breakers,
        provider_calls=doc.provider_calls,
        ratelimit_policies=policies,
        discovery=doc.discovery,
        flags=doc.flags,
    )
