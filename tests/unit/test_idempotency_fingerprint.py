"""Request fingerprints and key validation: the same request hashes the same, a different one never does."""

from __future__ import annotations

import pytest

from mercato.kit.idempotency import InvalidIdempotencyKey, parse_idempotency_key, request_fingerprint

JSON = "application/json"


def fp(body: bytes, *, method: str = "POST", path: str = "/v1/checkout", **kw: object) -> str:
    return request_fingerprint(method=method, path=path, body=body, content_type=JSON, **kw)  # type: ignore[arg-type]


def test_json_key_order_and_whitespace_do_not_matter() -> None:
    compact = b'{"cart":"c1","items":[{"sku":"A","qty":2}],"note":{"b":1,"a":2}}'
    spaced = b'{\n  "note": {"a": 2, "b": 1},\n  "items": [ {"qty": 2, "sku": "A"} ],\n  "cart": "c1"\n}'
    assert fp(compact) == fp(spaced)


def test_a_sha256_hex_digest() -> None:
    digest = fp(b"{}")
    assert len(digest) == 64
    assert int(digest, 16) >= 0


@pytest.mark.parametrize(
    ("other_body", "why"),
    [
        (b'{"cart":"c1","items":[{"sku":"B","qty":2}]}', "a different value"),
        (b'{"cart":"c1","items":[{"qty":2,"sku":"A"},{"qty":1,"sku":"C"}]}', "an extra array element"),
        (b'{"cart":"c1","items":[{"sku":"A","qty":"2"}]}', "a number became a string"),
        (b'{"cart":"c1"}', "a missing field"),
    ],
)
def test_a_different_document_is_a_different_request(other_body: bytes, why: str) -> None:
    assert fp(b'{"cart":"c1","items":[{"sku":"A","qty":2}]}') != fp(other_body), why


def test_array_order_matters() -> None:
    assert fp(b'{"items":["a","b"]}') != fp(b'{"items":["b","a"]}')


def test_method_path_and_query_are_part_of_the_request() -> None:
    body = b'{"a":1}'
    base = fp(body)
    assert fp(body, method="PATCH") != base
    assert fp(body, path="/v1/orders") != base
    assert fp(body, query_string=b"dry_run=1") != base
    assert fp(body, method="post") == base


def test_framing_leaves_no_ambiguity_between_parts() -> None:
    # Without length prefixes "/a" + "b" and "/ab" + "" could collide.
    a = request_fingerprint(method="POST", path="/a", body=b"b", content_type="text/plain")
    b = request_fingerprint(method="POST", path="/ab", body=b"", content_type="text/plain")
    assert a != b


def test_non_json_bodies_are_hashed_byte_for_byte() -> None:
    def raw(body: bytes) -> str:
        return request_fingerprint(method="POST", path="/p", body=body, content_type="text/plain")

    assert raw(b'{"a":1,"b":2}') != raw(b'{"b":2,"a":1}')
    assert raw(b"x") == raw(b"x")


def test_json_media_types_with_parameters_and_suffixes_are_canonicalised() -> None:
    one = request_fingerprint(
        method="POST", path="/p", body=b'{"a":1,"b":2}', content_type="application/json; charset=utf-8"
    )
    two = request_fingerprint(
        method="POST", path="/p", body=b'{ "b":2, "a":1 }', content_type="application/merge-patch+json"
    )
    assert one == two


def test_unparseable_json_falls_back_to_the_raw_bytes() -> None:
    assert fp(b"{not json") == fp(b"{not json")
    assert fp(b"{not json") != fp(b"{not  json")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"8e03978e-40d5"', "8e03978e-40d5"),
        ("  padded\t", "padded"),
        ("k" * 255, "k" * 255),
        ("!~", "!~"),
    ],
)
def test_valid_keys(raw: str, key: str) -> None:
    assert parse_idempotency_key(raw) == key


@pytest.mark.parametrize(
    "raw",
    ["", '""', "k" * 256, "has space", "tab\tinside", "caf\u00e9", "ctl\x01", '"a\\"b"', "   "],
)
def test_invalid_keys(raw: str) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        parse_idempotency_key(raw)
