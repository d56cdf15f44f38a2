"""Feature flags: boolean and multivariate, targeting rules, stable percentage rollouts, kill switches,
evaluated in-process from the runtime-configuration document (ADR 0046)."""

from mercato.kit.flags.evaluator import EvaluationContext, FlagEvaluation, Flags, FlagsCollector, bucket_of
from mercato.kit.flags.model import FlagRule, FlagSpec, RolloutSlice, boolean_flag

__all__ = [
    "EvaluationContext",
    "FlagEvaluation",
    "FlagRule",
    "FlagSpec",
    "Flags",
    "FlagsCollector",
    "RolloutSlice",
    "boolean_flag",
    "bucket_of",
]
