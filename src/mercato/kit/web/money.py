"""Money on the wire for API v2: `{"amount": "19.99", "currency": "EUR"}`.

Storage and v1 keep integer minor units. v2 shows the amount as a decimal *string* in major units
with exactly the currency's ISO 4217 minor-unit exponent ("19.99" EUR, "1999" JPY, "1.999" KWD):
a string so no client parses it into a binary float, and a fixed number of places so equal amounts
are equal strings. The conversion is integer arithmetic only, so it is exact.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, Field

__all__ = ["DEFAULT_EXPONENT", "MoneyOut", "format_amount", "minor_unit_exponent", "money"]

# ISO 4217 currencies whose minor unit is not 2 digits. Codes not listed (including any the catalog
# accepts without knowing them) use 2, the exponent of the great majority of currencies.
_EXPONENTS: Final[dict[str, int]] = {
    **dict.fromkeys(
        (
            "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG",
            "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF",
        ),
        0,
    ),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(("CLF", "UYW"), 4),
}  # fmt: skip
DEFAULT_EXPONENT: Final = 2


class MoneyOut(BaseModel):
    amount: str = Field(
        pattern=r"^-?[0-9]+(\.[0-9]+)?$",
        description="Decimal string in major units with the currency's ISO 4217 exponent, e.g. `19.99`.",
        examples=["19.99"],
    )
    currency: str = Field(description="ISO 4217 code", examples=["EUR"])


def minor_unit_exponent(currency: str) -> int:
    return _EXPONENTS.get(currency, DEFAULT_EXPONENT)


def format_amount(minor: int, currency: str) -> str:
    """`1999, "EUR"` -> `"19.99"`; `1999, "JPY"` -> `"1999"`; `5, "KWD"` -> `"0.005"`."""
    exponent = minor_unit_exponent(currency)
    sign = "-" if minor < 0 else ""
    digits = str(abs(minor))
    if exponent == 0:
        return sign + digits
    digits = digits.rjust(exponent + 1, "0")
    return f"{sign}{digits[:-exponent]}.{digits[-exponent:]}"


def money(minor: int, currency: str) -> dict[str, str]:
    return {"amount": format_amount(minor, currency), "currency": currency}
