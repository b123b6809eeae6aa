"""Payload validation against an action's JSON Schema: refusals name the field, bad schemas are configuration errors."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.protocol import (
    ConfigurationError,
    ErrorCode,
    MeshError,
    ValidationFailedError,
    compile_schema,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "count": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "a": {
            "type": "object",
            "properties": {"b": {"type": "integer"}},
            "required": ["b"],
            "additionalProperties": False,
        },
    },
    "required": ["text"],
    "additionalProperties": False,
}

validate = compile_schema(SCHEMA)


def refused(payload: Any, field: str, rule: str, message: str | None = None) -> ValidationFailedError:
    """Validate `payload`, expect a refusal naming `field` and `rule` (and saying `message`)."""
    with pytest.raises(ValidationFailedError) as info:
        validate(payload)
    err = info.value
    assert err.details == {"field": field, "rule": rule}, (err.details, err.message)
    assert err.code == ErrorCode.VALIDATION_FAILED and not err.retryable
    assert err.message.startswith(f"{field or 'payload'}: "), err.message
    if message is not None:
        assert err.message == message
    return err


@pytest.mark.parametrize(
    "payload",
    [
        {"text": "hi"},
        {"text": "", "count": 0, "tags": [], "a": {"b": 1}},
        {"text": "hi", "tags": ["x", "y"]},
    ],
    ids=repr,
)
def test_a_valid_payload_passes(payload: Any) -> None:
    """A payload the schema allows is accepted silently."""
    assert validate(payload) is None


def test_a_wrong_type_names_the_field() -> None:
    """A field of the wrong type is refused naming it."""
    refused({"text": 5}, "text", "type", "text: must be string")


def test_a_missing_required_field_names_the_field() -> None:
    """A missing required property is refused naming the missing property."""
    refused({}, "text", "required", "text: is required")


def test_an_extra_property_names_the_property() -> None:
    """A property the schema does not allow is refused naming it."""
    refused({"text": "hi", "colour": "red"}, "colour", "additionalProperties", "colour: is not allowed")


def test_a_nested_wrong_type_names_the_dotted_path() -> None:
    """A wrong field inside an object is named by its dotted path."""
    refused({"text": "hi", "a": {"b": "one"}}, "a.b", "type", "a.b: must be integer")


def test_a_nested_missing_field_names_the_dotted_path() -> None:
    """A missing property of a nested object is named by its dotted path."""
    refused({"text": "hi", "a": {}}, "a.b", "required", "a.b: is required")


def test_a_nested_extra_property_names_the_dotted_path() -> None:
    """An extra property of a nested object is named by its dotted path."""
    refused({"text": "hi", "a": {"b": 1, "c": 2}}, "a.c", "additionalProperties", "a.c: is not allowed")


def test_an_array_item_is_named_by_its_index() -> None:
    """A wrong array item is named by the array's path and the item's index in brackets."""
    refused({"text": "hi", "tags": ["ok", 7]}, "tags[1]", "type", "tags[1]: must be string")


def test_a_constraint_other_than_type_names_the_field() -> None:
    """Keywords such as minimum also name the offending field and the keyword."""
    refused({"text": "hi", "count": -1}, "count", "minimum")


@pytest.mark.parametrize("payload", [None, "text", 5, ["text"]], ids=repr)
def test_a_payload_of_the_wrong_type_names_the_empty_field(payload: Any) -> None:
    """A payload that is not even an object is refused with field "" (the payload itself)."""
    refused(payload, "", "type", "payload: must be object")


def test_binary_is_not_a_json_string() -> None:
    """MessagePack bin is not accepted where the schema says string."""
    refused({"text": b"hi"}, "text", "type", "text: must be string")


def test_an_empty_schema_accepts_anything() -> None:
    """The schema {} (an action declared without one) accepts any payload."""
    anything = compile_schema({})
    for payload in (None, 1, "x", b"\x00", [1, {"a": None}], {"k": [1.5]}):
        anything(payload)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nonsense"},
        {"type": 5},
        {"required": "text"},
        {"$ref": "#/definitions/missing"},
        {"$ref": "#"},  # would recurse forever when validating
        {"$ref": "http://127.0.0.1:9/schema.json"},  # fastjsonschema would fetch it
    ],
    ids=repr,
)
def test_an_invalid_schema_is_a_configuration_error(schema: dict[str, Any]) -> None:
    """A schema that is not valid JSON Schema raises ConfigurationError when compiled."""
    with pytest.raises(ConfigurationError) as info:
        compile_schema(schema)
    assert info.value.code == ErrorCode.CONFIGURATION


@pytest.mark.parametrize("schema", [{"pattern": "("}, {"properties": []}], ids=["bad-regex", "properties-list"])
def test_every_invalid_schema_is_a_configuration_error(schema: dict[str, Any]) -> None:
    """Any schema fastjsonschema cannot compile raises ConfigurationError, never another exception."""
    with pytest.raises(MeshError) as info:
        compile_schema(schema)
    assert isinstance(info.value, ConfigurationError)
    assert info.value.code == ErrorCode.CONFIGURATION
    assert info.value.message.startswith("invalid JSON Schema: ")

