"""How registry entries become MCP tools: names, schemas, order and selection (no I/O)."""

from __future__ import annotations

import re

import pytest

from mesh.mcp.tools import Selection, tools_from_registry
from mesh.protocol import ValidationFailedError, compile_schema

MCP_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")

REGISTRY = {
    "kv": {"nodes": 1, "actions": {
        "put": {"description": "Store.", "schema": {"type": "object", "properties": {"key": {"type": "string"}}}},
        "get": {"description": "Read.", "schema": {"type": "object"}, "idempotent": True},
        "delete": {"description": "", "schema": {}},
    }},
    "echo": {"nodes": 2, "actions": {"echo": {"description": "Echo.", "schema": {"type": "string"}}}},
    "odd": {"nodes": 1, "actions": "not a map"},
}


def test_tool_names_are_service_dot_action_valid_for_mcp_and_sorted() -> None:
    """Each action is one tool named service.action, in name order."""
    names = [t.name for t in tools_from_registry(REGISTRY)]
    assert names == ["echo.echo", "kv.delete", "kv.get", "kv.put"]
    assert all(MCP_TOOL_NAME.fullmatch(n) for n in names)


def test_the_same_registry_gives_the_same_tools() -> None:
    """Tools do not depend on the registry's key order (clients may cache them)."""
    reordered = {k: REGISTRY[k] for k in reversed(list(REGISTRY))}
    assert tools_from_registry(reordered) == tools_from_registry(REGISTRY)


def test_description_and_schema_come_from_the_registry() -> None:
    """An object schema is the inputSchema as it is; the description is the action's."""
    put = next(t for t in tools_from_registry(REGISTRY) if t.name == "kv.put")
    assert put.description == "Store."
    assert put.input_schema == REGISTRY["kv"]["actions"]["put"]["schema"]
    assert put.payload({"key": "a"}) == {"key": "a"}


def test_an_action_without_schema_or_description_still_makes_a_usable_tool() -> None:
    """No schema becomes an open object schema; no description names the action."""
    delete = next(t for t in tools_from_registry(REGISTRY) if t.name == "kv.delete")
    assert delete.input_schema == {"type": "object"}
    assert delete.description == "The mesh action kv.delete."


def test_a_non_object_schema_is_wrapped_in_a_payload_argument() -> None:
    """MCP arguments are an object, so a string payload travels as {"payload": ...}."""
    echo = next(t for t in tools_from_registry(REGISTRY) if t.name == "echo.echo")
    assert echo.wrapped and echo.input_schema["properties"]["payload"] == {"type": "string"}
    assert echo.payload({"payload": "hi"}) == "hi"


def test_a_wrapped_schema_keeps_its_refs_resolving() -> None:
    """Invariant: wrapping a schema in {"payload": ...} moves its `$ref`s with it, so the tool validates as the node."""
    schema = {"anyOf": [{"$ref": "#/definitions/n"}, {"type": "string"}], "definitions": {"n": {"type": "integer"}}}
    registry = {"num": {"nodes": 1, "actions": {"set": {"description": "", "schema": schema}}}}
    (tool,) = tools_from_registry(registry)
    assert tool.wrapped and schema["anyOf"][0] == {"$ref": "#/definitions/n"}  # the registry's copy is untouched
    validate = compile_schema(tool.input_schema)
    validate({"payload": 5})
    validate({"payload": "five"})
    with pytest.raises(ValidationFailedError):
        validate({"payload": [5]})


def test_include_and_exclude_globs_choose_the_tools_and_exclude_wins() -> None:
    """Only included names are kept, and an excluded name never is."""
    chosen = tools_from_registry(REGISTRY, Selection(include=("kv.*",), exclude=("*.delete",)))
    assert [t.name for t in chosen] == ["kv.get", "kv.put"]
    assert [t.name for t in tools_from_registry(REGISTRY, Selection(exclude=("kv.*",)))] == ["echo.echo"]
