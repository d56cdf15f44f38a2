from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from mercato.shop.catalog.model import InvalidProduct, NewProduct, ProductChanges, ProductQuery

NOW = datetime(2026, 11, 25, tzinfo=UTC)


def draft(**overrides: object) -> NewProduct:
    values: dict[str, object] = {
        "sku": "BOOK-1",
        "name": " Novel ",
        "price_minor": 1999,
        "currency": "EUR",
        "category": "books",
    }
    values.update(overrides)
    return NewProduct(**values)  # type: ignore[arg-type]


def test_create_normalises_name_and_starts_at_version_one() -> None:
    product = draft().create(product_id=uuid.uuid4(), now=NOW)
    assert product.name == "Novel"
    assert product.version == 1


@pytest.mark.parametrize(
    ("field", "value"), [("sku", "bad sku"), ("currency", "eur"), ("category", "Books"), ("price_minor", -1)]
)
def test_invalid_fields_are_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidProduct):
        draft(**{field: value}).create(product_id=uuid.uuid4(), now=NOW)


def test_changes_bump_version_and_empty_changes_do_not() -> None:
    product = draft().create(product_id=uuid.uuid4(), now=NOW)
    assert product.with_changes(ProductChanges(), now=NOW) is product
    changed = product.with_changes(ProductChanges(price_minor=2500), now=NOW)
    assert (changed.price_minor, changed.version) == (2500, 2)


def test_archive_is_idempotent() -> None:
    product = draft().create(product_id=uuid.uuid4(), now=NOW).archive(now=NOW)
    assert product.archived
    assert product.version == 2
    assert product.archive(now=NOW) is product


def test_inverted_price_range_is_rejected() -> None:
    with pytest.raises(InvalidProduct):
        ProductQuery(min_price_minor=10, max_price_minor=5)
