"""`JsonInt`: an integer as JSON Schema defines one, for strict request models.

JSON Schema (and so our OpenAPI) calls `3.0` an integer: a number with no fractional part. Pydantic's
strict mode refuses it, so a client that serialises whole numbers as floats (JavaScript, a generated
client, schemathesis) had a schema-valid body rejected. `JsonInt` accepts a whole float as its int
and keeps every other strictness (no strings, no booleans, no 2.5) - ADR 0028.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _whole_float_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WHOLE_NUMBER = BeforeValidator(_whole_float_to_int)
JsonInt = Annotated[int, WHOLE_NUMBER]
# Bounds on an optional JsonInt go before the validator (`Annotated[int, Field(ge=1), WHOLE_NUMBER] |
# None`): after it, pydantic writes them as "ge"/"le", which no JSON Schema reader knows.
