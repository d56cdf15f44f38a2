"""Pure parts of conditional requests and v2 money: tag parsing, comparison, decimal strings."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.gateway.versioning import V1_POLICY, DeprecationPolicy, requested_version
from mercato.kit.web.etags import (
    PreconditionRequired,
    VersionTag,
    content_etag,
    if_match_versions,
    if_none_match_hits,
)
from mercato.kit.web.money import format_amount, minor_unit_exponent

PID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def test_version_tags_round_trip_and_reject_foreign_shapes() -> None:
    tag = VersionTag("product", PID, 7, "v1")
    assert tag.render() == f'"product.{PID}.r7.v1"'
    assert VersionTag.parse(tag.render().strip('"')) == tag
    for opaque in ("", "product", f"product.{PID}.7.v1", f"product.{PID}.rx.v1", "product..r1.v1"):
        assert VersionTag.parse(opaque) is None


def test_if_match_names_versions_of_this_resource_only() -> None:
    own = VersionTag("product", PID, 3, "v1").render()
    v2 = VersionTag("product", PID, 4, "v2").render()
    other = VersionTag("product", "someone-else", 5, "v1").render()
    assert if_match_versions(f"{own}, {v2}, {other}", kind="product", resource_id=PID) == {3, 4}
    assert if_match_versions(f"W/{own}", kind="product", resource_id=PID) == frozenset()
    assert if_match_versions("not a tag", kind="product", resource_id=PID) == frozenset()
    assert if_match_versions(" * ", kind="product", resource_id=PID) is None
    for missing in (None, "", "   "):
        with pytest.raises(PreconditionRequired):
            if_match_versions(missing, kind="product", resource_id=PID)


def test_if_none_match_compares_weakly() -> None:
    etag = content_etag(b'{"lines":[]}')
    assert if_none_match_hits(etag, etag)
    assert if_none_match_hits(f"W/{etag}", etag)
    assert if_none_match_hits(f'"a", "b",{etag}', etag)
    assert if_none_match_hits("*", etag)
    assert not if_none_match_hits(None, etag)
    assert not if_none_match_hits('"a"', etag)
    assert content_etag(b"x") != content_etag(b"y")


@given(st.text(max_size=300))
def test_arbitrary_headers_never_raise(header: str) -> None:
    if_none_match_hits(header, '"x"')
    if header.strip():
        if_match_versions(header, kind="product", resource_id=PID)
    requested_version(header)


@pytest.mark.parametrize(
    ("minor", "currency", "amount"),
    [
        (1999, "EUR", "19.99"),
        (5, "EUR", "0.05"),
        (0, "USD", "0.00"),
        (1999, "JPY", "1999"),
        (5, "KWD", "0.005"),
        (12345, "CLF", "1.2345"),
        (-250, "EUR", "-2.50"),
        (100, "XYZ", "1.00"),
    ],
)
def test_amounts_use_the_currency_exponent(minor: int, currency: str, amount: str) -> None:
    assert format_amount(minor, currency) == amount


@given(st.integers(min_value=-(10**15), max_value=10**15), st.sampled_from(["EUR", "JPY", "KWD", "CLF"]))
def test_amounts_are_exact(minor: int, currency: str) -> None:
    text = format_amount(minor, currency)
    assert Decimal(text) == Decimal(minor).scaleb(-minor_unit_exponent(currency))


def test_accept_negotiation_prefers_quality_then_order() -> None:
    v2 = "application/vnd.mercato.v2+json"
    assert requested_version(None) is None
    assert requested_version("application/json") is None
    assert requested_version(v2) == 2
    assert requested_version(f"application/json, {v2};q=0.9") == 2
    assert requested_version(f"{v2};q=0") is None
    assert requested_version(f"application/vnd.mercato.v1+json;q=0.5, {v2}") == 2
    assert requested_version(f"{v2};q=abc") is None


def test_deprecation_headers_are_in_their_rfc_formats() -> None:
    assert V1_POLICY.deprecation_header == "@1795564800"
    assert V1_POLICY.sunset_header == "Tue, 30 Nov 2027 23:59:59 GMT"
    with pytest.raises(ValueError, match="sunset"):
        DeprecationPolicy(deprecated_at=V1_POLICY.sunset_at, sunset_at=V1_POLICY.deprecated_at)
