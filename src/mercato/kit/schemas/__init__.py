"""Versioned event schemas: compatibility rules, an offline catalog, upcasters and a registry.

- `compat`: can a reader with schema R read a writer's data under schema W? The BACKWARD /
  FORWARD / FULL (and transitive) modes are built on that one question (ADR 0017).
- `SchemaCatalog`: the schema files shipped with the code; checks each version chain offline
  (`mercato schemas check`), validates and stamps `dataschema` on produce.
- `Upcasters`: old versions into the current one on read.
- `SchemaRegistry`: the database-backed registry that refuses an incompatible registration.
"""

from mercato.kit.schemas.catalog import (
    EventSchemaViolation,
    SchemaCatalog,
    SchemaCatalogError,
    Subject,
    dataschema_uri,
    fingerprint,
    parse_dataschema,
)
from mercato.kit.schemas.compat import (
    Compatibility,
    Incompatibility,
    UnsupportedSchema,
    check_compatibility,
    closed,
    reader_problems,
    unsupported_keywords,
)
from mercato.kit.schemas.registry import (
    IncompatibleSchema,
    RegisteredSchema,
    SchemaNotFound,
    SchemaRegistry,
    schema_subjects,
    schema_versions,
)
from mercato.kit.schemas.upcasting import Upcaster, UpcastError, Upcasters

__all__ = [
    "Compatibility",
    "EventSchemaViolation",
    "Incompatibility",
    "IncompatibleSchema",
    "RegisteredSchema",
    "SchemaCatalog",
    "SchemaCatalogError",
    "SchemaNotFound",
    "SchemaRegistry",
    "Subject",
    "UnsupportedSchema",
    "UpcastError",
    "Upcaster",
    "Upcasters",
    "check_compatibility",
    "closed",
    "dataschema_uri",
    "fingerprint",
    "parse_dataschema",
    "reader_problems",
    "schema_subjects",
    "schema_versions",
    "unsupported_keywords",
]
