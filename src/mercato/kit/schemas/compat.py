"""Compatibility between two JSON Schemas of one subject, and the modes a subject declares.

The question underneath every mode is one: *can a reader holding schema R read every event a
writer produced under schema W?* (`reader_problems(reader=R, writer=W)`). BACKWARD asks it with
R = the new schema and W = the old one (deploy readers first), FORWARD the other way round
(deploy writers first), FULL both. The TRANSITIVE variants ask it against every earlier version,
not only the latest.

No maintained offline library answers this for JSON Schema, so this is ours, for a deliberately
small subset (ADR 0017). A schema using any keyword outside it is refused (`UnsupportedSchema`):
a checker that silently said "compatible" about a keyword it ignores would be worse than none.

One assumption makes open objects usable (and is enforced, see `closed`): writers put only
*declared* properties into an event. Readers stay open (`additionalProperties: true`) so an old
reader ignores a field a newer writer added; the producer side validates against the closed
form, so "a property the writer did not declare" never appears on the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "Compatibility",
    "Incompatibility",
    "UnsupportedSchema",
    "check_compatibility",
    "closed",
    "reader_problems",
    "unsupported_keywords",
]

Schema = Mapping[str, Any]

# What the checker understands. Annotations change no instance's validity; the rest are compared.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples"})
_ASSERTIONS = frozenset(
    {
        "type",
        "enum",
        "const",
        "format",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
    }
)
_SUPPORTED = _ANNOTATIONS | _ASSERTIONS
_ALL_TYPES = frozenset({"null", "boolean", "integer", "number", "string", "array", "object"})


class Compatibility(StrEnum):
    """A subject's evolution rule (the names and meanings of Confluent Schema Registry's modes)."""

    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def backward(self) -> bool:
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def forward(self) -> bool:
        return self.value.startswith(("FORWARD", "FULL"))


@dataclass(frozen=True, slots=True)
class Incompatibility:
    """One reason a reader cannot read a writer's data; `path` is a JSON Pointer into the schema."""

    path: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.rule}: {self.detail}"


class UnsupportedSchema(ValueError):
    """The schema uses keywords outside the subset the compatibility checker understands."""


def unsupported_keywords(schema: Any, path: str = "") -> list[str]:
    """JSON Pointers of every keyword outside the supported subset (empty: the schema is usable)."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, Mapping):
        return [f"{path or '/'} (not a schema object)"]
    found = [f"{path}/{key}" for key in schema if key not in _SUPPORTED]
    for name, sub in (schema.get("properties") or {}).items():
        found += unsupported_keywords(sub, f"{path}/properties/{name}")
    if isinstance(schema.get("additionalProperties"), Mapping):
        found += unsupported_keywords(schema["additionalProperties"], f"{path}/additionalProperties")
    if "items" in schema:
        found += unsupported_keywords(schema["items"], f"{path}/items")
    return found


def closed(schema: Schema) -> dict[str, Any]:
    """The same schema with every object that declares properties closed to undeclared ones.

    Producers validate against this form: it is what makes the checker's "writers emit only
    declared properties" assumption true, while consumers keep validating against the open one.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _close_sub(sub) for name, sub in out["properties"].items()}
        if not isinstance(out.get("additionalProperties"), Mapping):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), Mapping):
        out["additionalProperties"] = closed(out["additionalProperties"])
    if "items" in out:
        out["items"] = _close_sub(out["items"])
    return out


def _close_sub(sub: Any) -> Any:
    return closed(sub) if isinstance(sub, Mapping) else sub


def check_compatibility(
    mode: Compatibility, candidate: Schema, history: Sequence[Schema]
) -> list[Incompatibility]:
    """Why `candidate` may not follow `history` (oldest first) under `mode`; empty when it may."""
    for schema in (candidate, *history):
        bad = unsupported_keywords(schema)
        if bad:
            raise UnsupportedSchema("keywords outside the supported subset: " + ", ".join(bad))
    if mode is Compatibility.NONE or not history:
        return []
    against = history if mode.transitive else history[-1:]
    problems: list[Incompatibility] = []
    for index, previous in enumerate(against):
        label = f"version {index + 1}" if mode.transitive else "the latest version"
        if mode.backward:
            problems += _labelled(reader_problems(reader=candidate, writer=previous), "BACKWARD", label)
        if mode.forward:
            problems += _labelled(reader_problems(reader=previous, writer=candidate), "FORWARD", label)
    return problems


def _labelled(items: Iterable[Incompatibility], direction: str, label: str) -> list[Incompatibility]:
    return [Incompatibility(i.path, i.rule, f"{i.detail} ({direction} against {label})") for i in items]


def reader_problems(*, reader: Any, writer: Any, path: str = "") -> list[Incompatibility]:
    """Why some instance valid under `writer` (closed) could be invalid under `reader`."""
    if reader is True or reader == {}:
        return []
    if reader is False:
        return [] if writer is False else [Incompatibility(path, "rejected", "the reader accepts nothing")]
    if writer is False:
        return []
    if writer is True:
        writer = {}
    problems = _type_problems(reader, writer, path)
    problems += _enum_problems(reader, writer, path)
    problems += _bound_problems(reader, writer, path)
    for key in ("format", "pattern"):
        if key in reader and reader[key] != writer.get(key):
            problems.append(Incompatibility(path, f"{key}_changed", f"reader demands {key} {reader[key]!r}"))
    writer_types = _types(writer)
    if "object" in writer_types and "object" in _types(reader):
        problems += _object_problems(reader, writer, path)
    if "array" in writer_types and "array" in _types(reader) and "items" in reader:
        problems += reader_problems(
            reader=reader["items"], writer=writer.get("items", {}), path=f"{path}/items"
        )
    return problems


def _types(schema: Schema) -> frozenset[str]:
    declared = schema.get("type")
    if declared is None:
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else list(schema["enum"])
            return frozenset(_json_type(v) for v in values)
        return _ALL_TYPES
    names = {declared} if isinstance(declared, str) else set(declared)
    if "number" in names:
        names.add("integer")  # every integer is a number
    return frozenset(names)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _type_problems(reader: Schema, writer: Schema, path: str) -> list[Incompatibility]:
    missing = _types(writer) - _types(reader)
    if not missing:
        return []
    return [
        Incompatibility(
            path,
            "type_narrowed",
            f"writer may send {sorted(missing)}, reader accepts {sorted(_types(reader))}",
        )
    ]


def _values(schema: Schema) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if "enum" in schema else None


def _enum_problems(reader: Schema, writer: Schema, path: str) -> list[Incompatibility]:
    allowed = _values(reader)
    if allowed is None:
        return []
    sent = _values(writer)
    if sent is None:
        return [Incompatibility(path, "enum_added", "reader restricts values the writer does not")]
    extra = [v for v in sent if v not in allowed]
    if extra:
        return [Incompatibility(path, "enum_narrowed", f"reader does not accept {extra}")]
    return []


# (keyword, True when the reader's bound must be <= the writer's, i.e. a lower bound)
_BOUNDS = (
    ("minimum", True),
    ("minLength", True),
    ("minItems", True),
    ("maximum", False),
    ("maxLength", False),
    ("maxItems", False),
)


def _bound_problems(reader: Schema, writer: Schema, path: str) -> list[Incompatibility]:
    problems = []
    for key, lower in _BOUNDS:
        if key not in reader:
            continue
        theirs = writer.get(key)
        looser = theirs is not None and (reader[key] <= theirs if lower else reader[key] >= theirs)
        if not looser:
            problems.append(
                Incompatibility(
                    path, f"{key}_tightened", f"reader demands {key} {reader[key]}, writer {theirs}"
                )
            )
    return problems


def _object_problems(reader: Schema, writer: Schema, path: str) -> list[Incompatibility]:
    problems: list[Incompatibility] = []
    reader_props: Mapping[str, Any] = reader.get("properties", {})
    writer_props: Mapping[str, Any] = writer.get("properties", {})
    guaranteed = set(writer.get("required", []))
    for name in reader.get("required", []):
        if name not in guaranteed:
            rule = "required_added" if name in writer_props else "required_missing"
            problems.append(
                Incompatibility(
                    f"{path}/properties/{name}",
                    rule,
                    f"reader requires {name!r}, writer does not guarantee it",
                )
            )
    additional = reader.get("additionalProperties", True)
    for name, written in writer_props.items():
        where = f"{path}/properties/{name}"
        if name in reader_props:
            problems += reader_problems(reader=reader_props[name], writer=written, path=where)
        elif additional is False:
            problems.append(
                Incompatibility(where, "property_rejected", f"reader is closed and does not declare {name!r}")
            )
        else:
            problems += reader_problems(reader=additional, writer=written, path=where)
    if not writer_props and "properties" not in writer and reader_props:
        # A writer that declares no properties at all may send anything: only an open,
        # unconstrained reader is safe.
        problems.append(Incompatibility(path, "object_unconstrained", "writer declares no properties"))
    return problems
