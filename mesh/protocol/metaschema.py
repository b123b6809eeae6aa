"""The JSON Schema draft-07 meta-schema: what a registered payload schema must satisfy.

A copy of http://json-schema.org/draft-07/schema (the schema of schemas published by
json-schema.org), kept here so that checking a schema never goes to the network. Two
changes: no `$id` / `$schema`, so that the validator compiled from it resolves its
`$ref`s inside this dict only, and no `default`s, which nothing here uses.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["DRAFT_07", "DRAFT_07_URIS"]

# The `$schema` values that name this draft (payloads are validated as draft-07).
DRAFT_07_URIS: Final = frozenset({"http://json-schema.org/draft-07/schema", "http://json-schema.org/draft-07/schema#"})

_SCHEMA: Final = {"$ref": "#"}
_SCHEMA_ARRAY: Final = {"$ref": "#/definitions/schemaArray"}
_COUNT: Final = {"$ref": "#/definitions/nonNegativeInteger"}
_COUNT0: Final = {"$ref": "#/definitions/nonNegativeIntegerDefault0"}
_NUMBER: Final = {"type": "number"}
_STRING: Final = {"type": "string"}
_SCHEMA_MAP: Final = {"type": "object", "additionalProperties": {"$ref": "#"}}

DRAFT_07: Final[dict[str, Any]] = {
    "title": "Core schema meta-schema",
    "definitions": {
        "schemaArray": {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
        "nonNegativeInteger": {"type": "integer", "minimum": 0},
        "nonNegativeIntegerDefault0": {"allOf": [{"$ref": "#/definitions/nonNegativeInteger"}]},
        "simpleTypes": {"enum": ["array", "boolean", "integer", "null", "number", "object", "string"]},
        "stringArray": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    },
    "type": ["object", "boolean"],
    "properties": {
        "$id": {"type": "string", "format": "uri-reference"},
        "$schema": {"type": "string", "format": "uri"},
        "$ref": {"type": "string", "format": "uri-reference"},
        "$comment": _STRING,
        "title": _STRING,
        "description": _STRING,
        "default": True,
        "readOnly": {"type": "boolean"},
        "examples": {"type": "array", "items": True},
        "multipleOf": {"type": "number", "exclusiveMinimum": 0},
        "maximum": _NUMBER,
        "exclusiveMaximum": _NUMBER,
        "minimum": _NUMBER,
        "exclusiveMinimum": _NUMBER,
        "maxLength": _COUNT,
        "minLength": _COUNT0,
        "pattern": {"type": "string", "format": "regex"},
        "additionalItems": _SCHEMA,
        "items": {"anyOf": [_SCHEMA, _SCHEMA_ARRAY]},
        "maxItems": _COUNT,
        "minItems": _COUNT0,
        "uniqueItems": {"type": "boolean"},
        "contains": _SCHEMA,
        "maxProperties": _COUNT,
        "minProperties": _COUNT0,
        "required": {"$ref": "#/definitions/stringArray"},
        "additionalProperties": _SCHEMA,
        "definitions": _SCHEMA_MAP,
        "properties": _SCHEMA_MAP,
        "patternProperties": {**_SCHEMA_MAP, "propertyNames": {"format": "regex"}},
        "dependencies": {
            "type": "object",
            "additionalProperties": {"anyOf": [_SCHEMA, {"$ref": "#/definitions/stringArray"}]},
        },
        "propertyNames": _SCHEMA,
        "const": True,
        "enum": {"type": "array", "items": True},
        "type": {
            "anyOf": [
                {"$ref": "#/definitions/simpleTypes"},
                {"type": "array", "items": {"$ref": "#/definitions/simpleTypes"}, "minItems": 1, "uniqueItems": True},
            ]
        },
        "format": _STRING,
        "contentMediaType": _STRING,
        "contentEncoding": _STRING,
        "if": _SCHEMA,
        "then": _SCHEMA,
        "else": _SCHEMA,
        "allOf": _SCHEMA_ARRAY,
        "anyOf": _SCHEMA_ARRAY,
        "oneOf": _SCHEMA_ARRAY,
        "not": _SCHEMA,
    },
}
