"""An OpenFeature provider over `Flags` (ADR 0046): code that prefers the standard API
(`openfeature.api.get_client().get_boolean_value(...)`) gets the same evaluations, counters and
reasons. The shop's request path calls `Flags` directly (see the ADR's measured overhead)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from openfeature.evaluation_context import EvaluationContext as OFContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata

from mercato.kit.flags.evaluator import EvaluationContext, Flags

__all__ = ["MercatoFlagProvider"]


def _context(context: OFContext | None) -> EvaluationContext:
    if context is None:
        return EvaluationContext()
    attrs = context.attributes

    def text(name: str) -> str | None:
        value = attrs.get(name)
        return value if isinstance(value, str) else None

    return EvaluationContext(
        targeting_key=context.targeting_key, role=text("role"), tenant=text("tenant"), track=text("track")
    )


class MercatoFlagProvider(AbstractProvider):
    def __init__(self, flags: Flags) -> None:
        self._flags = flags

    def get_metadata(self) -> Metadata:
        return Metadata(name="mercato-runtime-config")

    def get_provider_hooks(self) -> list[Any]:
        return []

    def _resolve(
        self, key: str, default: Any, context: OFContext | None, kind: type
    ) -> FlagResolutionDetails[Any]:
        result = self._flags.evaluate(key, _context(context), default=default)
        if result.reason == "FLAG_NOT_FOUND":
            return FlagResolutionDetails(
                default,
                error_code=ErrorCode.FLAG_NOT_FOUND,
                reason=Reason.ERROR,
                error_message=f"no flag {key!r}",
            )
        if not isinstance(result.value, kind) or (kind is int and isinstance(result.value, bool)):
            return FlagResolutionDetails(
                default,
                error_code=ErrorCode.TYPE_MISMATCH,
                reason=Reason.ERROR,
                error_message=f"flag {key!r} is {type(result.value).__name__}",
            )
        return FlagResolutionDetails(result.value, variant=result.variant, reason=Reason(result.reason))

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: OFContext | None = None
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, evaluation_context, bool)

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: OFContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, evaluation_context, str)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: OFContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, evaluation_context, int)

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: OFContext | None = None
    ) -> FlagResolutionDetails[float]:
        return self._resolve(flag_key, default_value, evaluation_context, float)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[Any] | Mapping[str, Any],
        evaluation_context: OFContext | None = None,
    ) -> FlagResolutionDetails[Sequence[Any] | Mapping[str, Any]]:
        return self._resolve(flag_key, default_value, evaluation_context, (dict, list))  # type: ignore[arg-type]
