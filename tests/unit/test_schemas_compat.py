"""The JSON Schema compatibility checker: each rule, each mode, and properties over random schemas."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from mercato.kit.schemas import (
    Compatibility,
    UnsupportedSchema,
    check_compatibility,
    closed,
    reader_problems,
)


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": True,
        **extra,
    }


BASE = obj({"id": {"type": "string"}, "amount": {"type": "integer"}})


def rules(reader: Any, writer: Any) -> set[str]:
    return {p.rule for p in reader_problems(reader=reader, writer=writer)}


# ---- single rules (reader reads writer's data) -------------------------------------------------


def test_identical_schemas_are_compatible() -> None:
    assert rules(BASE, BASE) == set()


def test_reader_requiring_a_field_the_writer_does_not_send_breaks() -> None:
    reader = obj({**BASE["properties"], "currency": {"type": "string"}})
    assert rules(reader, BASE) == {"required_missing"}


def test_reader_requiring_a_field_the_writer_sends_only_sometimes_breaks() -> None:
    writer = obj(BASE["properties"], required=["id"])
    assert rules(BASE, writer) == {"required_added"}


def test_an_optional_field_the_writer_never_sends_is_fine() -> None:
    reader = obj({**BASE["properties"], "note": {"type": "string", "default": ""}}, required=["id", "amount"])
    assert rules(reader, BASE) == set()


def test_an_open_reader_ignores_fields_it_does_not_declare() -> None:
    writer = obj({**BASE["properties"], "note": {"type": "string"}})
    assert rules(BASE, writer) == set()


def test_a_closed_reader_rejects_fields_it_does_not_declare() -> None:
    reader = {**BASE, "additionalProperties": False}
    writer = obj({**BASE["properties"], "note": {"type": "string"}})
    assert rules(reader, writer) == {"property_rejected"}


def test_an_additional_properties_schema_is_applied_to_undeclared_fields() -> None:
    reader = {**BASE, "additionalProperties": {"type": "string"}}
    assert rules(reader, obj({**BASE["properties"], "note": {"type": "string"}})) == set()
    assert rules(reader, obj({**BASE["properties"], "n": {"type": "integer"}})) == {"type_narrowed"}


def test_a_narrowed_type_breaks_and_a_widened_one_does_not() -> None:
    as_number = obj({"id": {"type": "string"}, "amount": {"type": "number"}})
    assert rules(BASE, as_number) == {"type_narrowed"}  # integer reader, number writer
    assert rules(as_number, BASE) == set()  # every integer is a number


def test_nullable_types_are_sets() -> None:
    nullable = obj({"id": {"type": ["string", "null"]}, "amount": {"type": "integer"}})
    assert rules(nullable, BASE) == set()
    assert rules(BASE, nullable) == {"type_narrowed"}


def test_enums_may_grow_for_readers_only() -> None:
    small = obj({"status": {"type": "string", "enum": ["paid", "shipped"]}})
    large = obj({"status": {"type": "string", "enum": ["paid", "shipped", "returned"]}})
    assert rules(large, small) == set()
    assert rules(small, large) == {"enum_narrowed"}
    assert rules(small, obj({"status": {"type": "string"}})) == {"enum_added"}
    assert rules(small, obj({"status": {"const": "paid"}})) == set()


def test_bounds_may_only_loosen_for_readers() -> None:
    loose = obj({"n": {"type": "integer", "minimum": 0}})
    tight = obj({"n": {"type": "integer", "minimum": 1}})
    assert rules(loose, tight) == set()
    assert rules(tight, loose) == {"minimum_tightened"}
    assert rules(obj({"s": {"type": "string", "maxLength": 3}}), obj({"s": {"type": "string"}})) == {
        "maxLength_tightened"
    }


def test_format_and_pattern_the_reader_demands_must_be_the_writers() -> None:
    plain = obj({"id": {"type": "string"}})
    uuid = obj({"id": {"type": "string", "format": "uuid"}})
    assert rules(plain, uuid) == set()
    assert rules(uuid, plain) == {"format_changed"}
    assert rules(obj({"c": {"type": "string", "pattern": "^[A-Z]{3}$"}}), obj({"c": {"type": "string"}})) == {
        "pattern_changed"
    }


def test_nested_objects_in_arrays_are_compared_with_paths() -> None:
    v1 = obj({"items": {"type": "array", "items": obj({"sku": {"type": "string"}})}})
    v2 = obj(
        {"items": {"type": "array", "items": obj({"sku": {"type": "string"}, "qty": {"type": "integer"}})}}
    )
    problems = reader_problems(reader=v2, writer=v1)
    assert [(p.path, p.rule) for p in problems] == [
        ("/properties/items/items/properties/qty", "required_missing")
    ]


def test_annotations_never_matter() -> None:
    annotated = {**BASE, "title": "x", "description": "y", "$comment": "z", "examples": [{}]}
    assert rules(annotated, BASE) == rules(BASE, annotated) == set()


@pytest.mark.parametrize("keyword", [{"anyOf": [{"type": "string"}]}, {"$ref": "#/$defs/x"}, {"not": {}}])
def test_keywords_outside_the_subset_are_refused_not_ignored(keyword: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedSchema):
        check_compatibility(Compatibility.BACKWARD, {**BASE, **keyword}, [BASE])


# ---- modes ------------------------------------------------------------------------------------

ADD_OPTIONAL = obj({**BASE["properties"], "note": {"type": "string"}}, required=["id", "amount"])
ADD_REQUIRED = obj({**BASE["properties"], "note": {"type": "string"}})
DROP_REQUIRED = obj({"id": {"type": "string"}})


@pytest.mark.parametrize(
    ("mode", "candidate", "ok"),
    [
        (Compatibility.BACKWARD, ADD_OPTIONAL, True),
        (Compatibility.BACKWARD, ADD_REQUIRED, False),  # new reader, old data lacks `note`
        (Compatibility.BACKWARD, DROP_REQUIRED, True),  # new reader ignores `amount`
        (Compatibility.FORWARD, ADD_OPTIONAL, True),
        (Compatibility.FORWARD, ADD_REQUIRED, True),  # old reader ignores `note`
        (Compatibility.FORWARD, DROP_REQUIRED, False),  # old reader needs `amount`
        (Compatibility.FULL, ADD_OPTIONAL, True),
        (Compatibility.FULL, ADD_REQUIRED, False),
        (Compatibility.FULL, DROP_REQUIRED, False),
        (Compatibility.NONE, DROP_REQUIRED, True),
    ],
)
def test_modes_against_the_latest_version(mode: Compatibility, candidate: dict[str, Any], ok: bool) -> None:
    assert (check_compatibility(mode, candidate, [BASE]) == []) is ok


def test_transitive_modes_check_every_earlier_version_plain_ones_only_the_latest() -> None:
    v1 = obj({"id": {"type": "string"}, "amount": {"type": "integer"}})
    v2 = obj({"id": {"type": "string"}, "amount": {"type": "integer"}}, required=["id"])
    v3 = obj({"id": {"type": "string"}, "amount": {"type": "integer"}})  # requires amount again
    # v3 (reader) vs v2 (writer): v2 data may lack amount, so BACKWARD breaks against v2 ...
    assert check_compatibility(Compatibility.BACKWARD, v3, [v1, v2])
    # ... FORWARD: the v2 reader reads v3 data, the v1 reader too.
    assert check_compatibility(Compatibility.FORWARD, v3, [v1, v2]) == []
    v3_forward_break = obj({"id": {"type": "string"}}, required=["id"])
    # Against the latest (v2, which does not require amount) dropping amount is fine; v1 requires it.
    assert check_compatibility(Compatibility.FORWARD, v3_forward_break, [v1, v2]) == []
    problems = check_compatibility(Compatibility.FORWARD_TRANSITIVE, v3_forward_break, [v1, v2])
    assert [p.rule for p in problems] == ["required_missing"]
    assert "version 1" in problems[0].detail


def test_closed_form_refuses_undeclared_fields_at_every_level() -> None:
    schema = obj({"items": {"type": "array", "items": obj({"sku": {"type": "string"}})}})
    strict = Draft202012Validator(closed(schema))
    assert strict.is_valid({"items": [{"sku": "a"}]})
    assert not strict.is_valid({"items": [{"sku": "a"}], "extra": 1})
    assert not strict.is_valid({"items": [{"sku": "a", "extra": 1}]})
    assert Draft202012Validator(schema).is_valid({"items": [{"sku": "a", "extra": 1}], "extra": 1})


# ---- properties -------------------------------------------------------------------------------

LEAVES = st.sampled_from(
    [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": ["string", "null"]},
        {"type": "integer", "minimum": 0},
        {"type": "string", "enum": ["a", "b"]},
        {"type": "string", "enum": ["a"]},
    ]
)
NAMES = st.sampled_from(["a", "b", "c", "d"])


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(NAMES, children, max_size=4).flatmap(
        lambda props: st.builds(
            lambda req, open_: {
                "type": "object",
                "properties": props,
                "required": sorted(req),
                "additionalProperties": open_,
            },
            st.sets(st.sampled_from(sorted(props))) if props else st.just(set()),
            st.booleans(),
        )
    )


SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: _objects(inner) | st.builds(lambda i: {"type": "array", "items": i}, inner),
    max_leaves=8,
)
TOP = _objects(SCHEMAS)


def _instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances valid under the closed form of `schema`: what a validating producer may write."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema["type"]
    if isinstance(kind, list):
        return st.one_of(*(_instances({"type": k}) for k in kind))
    if kind == "object":
        props = schema["properties"]
        required = {k: _instances(v) for k, v in props.items() if k in schema["required"]}
        optional = {k: _instances(v) for k, v in props.items() if k not in schema["required"]}
        return st.fixed_dictionaries(required, optional=optional)
    if kind == "array":
        return st.lists(_instances(schema["items"]), max_size=3)
    return {
        "string": st.text(max_size=3),
        "integer": st.integers(min_value=schema.get("minimum", -5), max_value=5),
        "number": st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-5, 5),
        "boolean": st.booleans(),
        "null": st.none(),
    }[kind]


@settings(max_examples=150, deadline=None)
@given(TOP)
def test_every_schema_is_fully_compatible_with_itself(schema: dict[str, Any]) -> None:
    assert check_compatibility(Compatibility.FULL_TRANSITIVE, schema, [copy.deepcopy(schema)]) == []


@settings(max_examples=150, deadline=None)
@given(TOP, st.data())
def test_the_checker_is_sound_whatever_it_accepts_really_validates(writer: dict[str, Any], data: Any) -> None:
    """If the checker says the reader reads the writer's data, every instance a producer may write
    under the writer validates under the reader (checked with the real validator)."""
    reader = data.draw(TOP | st.just(_loosened(writer)))
    if reader_problems(reader=reader, writer=writer):
        return
    validator = Draft202012Validator(reader)
    for _ in range(5):
        instance = data.draw(_instances(writer))
        assert validator.is_valid(instance), (reader, writer, instance)


def _loosened(schema: dict[str, Any]) -> dict[str, Any]:
    """A reader built from the writer by dropping `required` and opening objects: often compatible,
    so the soundness property is exercised on accepted pairs, not only on refused ones."""
    out = copy.deepcopy(schema)
    if out.get("type") == "object":
        out["required"] = out["required"][:1]
        out["additionalProperties"] = True
        out["properties"] = {k: _loosened(v) for k, v in out["properties"].items()}
    return out


@settings(max_examples=100, deadline=None)
@given(TOP, NAMES, LEAVES)
def test_adding_an_optional_property_to_an_open_object_is_full_compatible(
    schema: dict[str, Any], name: str, leaf: dict[str, Any]
) -> None:
    old = {**schema, "additionalProperties": True}
    new = copy.deepcopy(old)
    new["properties"] = {**new["properties"], f"new_{name}": leaf}
    assert check_compatibility(Compatibility.FULL, new, [old]) == []


@settings(max_examples=100, deadline=None)
@given(TOP, NAMES, LEAVES)
def test_adding_a_required_property_is_never_backward_compatible(
    schema: dict[str, Any], name: str, leaf: dict[str, Any]
) -> None:
    new = copy.deepcopy(schema)
    new["properties"] = {**new["properties"], f"new_{name}": leaf}
    new["required"] = [*new["required"], f"new_{name}"]
    assert check_compatibility(Compatibility.BACKWARD, new, [schema])
