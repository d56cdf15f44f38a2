"""Evaluate flags from the in-process copy of the configuration document: no I/O, microseconds.

`Flags.replace(specs)` swaps the whole set in one assignment (called from the configuration watcher's
commit). `evaluate` hashes (flag, salt, targeting key) with BLAKE2b into one of 10 000 buckets, so one
customer gets the same variant on every process and every call, and a rollout's share is its
percentage to within sampling error. Each evaluation is counted per flag and variant.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from mercato.kit.flags.model import BUCKETS, FlagSpec

__all__ = ["EvaluationContext", "FlagEvaluation", "Flags", "FlagsCollector", "bucket_of"]


@dataclass(frozen=True, slots=True)
class EvaluationContext:
    """Who is asking: OpenFeature's evaluation context with its `targeting_key` (the customer id)."""

    targeting_key: str | None = None
    role: str | None = None
    tenant: str | None = None
    track: str | None = None  # the serving process's release track


@dataclass(frozen=True, slots=True)
class FlagEvaluation:
    """OpenFeature's resolution details: value, variant and the reason it was chosen."""

    flag: str
    value: Any
    variant: str
    reason: str  # DISABLED | TARGETING_MATCH | SPLIT | DEFAULT | FLAG_NOT_FOUND


def bucket_of(flag: str, salt: str, targeting_key: str) -> int:
    digest = hashlib.blake2b(f"{flag}\x00{salt}\x00{targeting_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


@dataclass
class Flags:
    specs: Mapping[str, FlagSpec] = field(default_factory=dict)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def replace(self, specs: Mapping[str, FlagSpec]) -> None:
        self.specs = dict(specs)

    def evaluate(self, flag: str, context: EvaluationContext, default: Any = None) -> FlagEvaluation:
        spec = self.specs.get(flag)
        if spec is None:
            result = FlagEvaluation(flag, default, "default", "FLAG_NOT_FOUND")
        else:
            result = _decide(flag, spec, context)
        self.counts[(flag, result.variant)] += 1
        return result

    def is_on(self, flag: str, context: EvaluationContext) -> bool:
        return self.evaluate(flag, context, default=False).value is True


def _decide(flag: str, spec: FlagSpec, context: EvaluationContext) -> FlagEvaluation:
    if not spec.enabled:
        return FlagEvaluation(flag, spec.variants[spec.off_variant], spec.off_variant, "DISABLED")
    for rule in spec.rules:
        if (
            (not rule.roles or context.role in rule.roles)
            and (not rule.tenants or context.tenant in rule.tenants)
            and (not rule.customers or context.targeting_key in rule.customers)
            and (not rule.tracks or context.track in rule.tracks)
        ):
            return FlagEvaluation(flag, spec.variants[rule.variant], rule.variant, "TARGETING_MATCH")
    if spec.rollout and context.targeting_key is not None:
        bucket = bucket_of(flag, spec.salt, context.targeting_key)
        edge = 0.0
        for part in spec.rollout:
            edge += part.percent * (BUCKETS / 100)
            if bucket < edge:
                return FlagEvaluation(flag, spec.variants[part.variant], part.variant, "SPLIT")
    return FlagEvaluation(flag, spec.variants[spec.default_variant], spec.default_variant, "DEFAULT")


class FlagsCollector(Collector):
    """`mercato_flag_evaluations_total{flag, variant}` from the evaluator's plain counters (an
    increment on the hot path is a dict update, not a Prometheus lock)."""

    def __init__(self, flags: Flags) -> None:
        self._flags = flags

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "mercato_flag_evaluations", "Flag evaluations by flag and variant.", labels=["flag", "variant"]
        )
        for (flag, variant), count in sorted(self._flags.counts.items()):
            family.add_metric([flag, variant], count)
        yield family
