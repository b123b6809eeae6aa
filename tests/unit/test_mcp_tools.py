"""How registry entries become MCP tools: names, schemas, order and selection (no I/O)."""

from __future__ import annotations

import hashlib
import itertools
import re

import pytest

from mesh.mcp.tools import Selection, find_tool, tool_names, tools_from_registry
from mesh.protocol import ValidationFailedError, compile_schema

# The rule Claude's and OpenAI's tool APIs enforce, written out here rather than imported,
# so that a change to the module's own pattern cannot make the tests agree with it.
PORTABLE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

REGISTRY = {
    "kv": {"nodes": 1, "actions": {
        "put": {"description": "Store.", "schema": {"type": "object", "properties": {"key": {"type": "string"}}}},
        "get": {"description": "Read.", "schema": {"type": "object"}, "idempotent": True},
        "delete": {"description": "", "schema": {}},
    }},
    "echo": {"nodes": 2, "actions": {"echo": {"description": "Echo.", "schema": {"type": "string"}}}},
    "odd": {"nodes": 1, "actions": "not a map"},
}


def test_tool_names_are_service_underscore_action_portable_and_sorted() -> None:
    """Each action is one tool named service_action, in name order, titled by its mesh name."""
    tools = tools_from_registry(REGISTRY)
    names = [t.name for t in tools]
    assert names == ["echo_echo", "kv_delete", "kv_get", "kv_put"]
    assert all(PORTABLE.fullmatch(n) for n in names)
    assert [t.mesh_name for t in tools] == ["echo.echo", "kv.delete", "kv.get", "kv.put"]


def _registry(mesh_names: list[str]) -> dict[str, dict]:
    """A registry holding `mesh_names`, its services and actions inserted in the given order."""
    registry: dict[str, dict] = {}
    for mesh_name in mesh_names:
        service, action = mesh_name.split(".")
        registry.setdefault(service, {"nodes": 1, "actions": {}})["actions"][action] = {"description": "", "schema": {}}
    return registry


LONG_A = "s" * 64 + "." + "a" * 64  # a 129-character mesh name, the longest a mesh allows
LONG_B = "s" * 64 + "." + "a" * 63 + "b"  # the same first 64 characters once `.` is `_`
COLLIDING = ["a_b.c", "a.b_c", "a-b.c", "a.b-c", "x.y_z", "x_y.z", LONG_A, LONG_B, "echo.echo"]


def _hash8(mesh_name: str) -> str:
    return hashlib.sha256(mesh_name.encode()).hexdigest()[:8]


def test_colliding_and_too_long_names_are_portable_unique_and_independent_of_order() -> None:
    """Invariant: names match the portable rule, never repeat, and do not depend on registration order.

    Every name that collides under the naive `.` -> `_` mapping, or passes 64 characters,
    gets a hash of its own mesh name (not only the later one), so any order gives the
    same table.
    """
    first = {(t.mesh_name, t.name) for t in tools_from_registry(_registry(COLLIDING))}
    for order in itertools.islice(itertools.permutations(COLLIDING), 0, None, 997):
        assert {(t.mesh_name, t.name) for t in tools_from_registry(_registry(list(order)))} == first
    reverse = tools_from_registry(_registry(list(reversed(COLLIDING))))
    assert {(t.mesh_name, t.name) for t in reverse} == first
    names = [name for _, name in first]
    assert len(first) == len(COLLIDING) and len(set(names)) == len(names)
    assert all(PORTABLE.fullmatch(n) for n in names), names
    table = dict(first)
    assert table["echo.echo"] == "echo_echo"  # a name nobody shares stays as it is
    assert table["a_b.c"] == f"a_b_c_{_hash8('a_b.c')}" and table["a.b_c"] == f"a_b_c_{_hash8('a.b_c')}"
    assert table[LONG_A] == "s" * 55 + f"_{_hash8(LONG_A)}" and len(table[LONG_A]) == 64


def test_a_name_equal_to_another_ones_hashed_name_is_hashed_itself() -> None:
    """A mesh name whose plain tool name is another tool's hashed name does not take it."""
    squatter = f"a_b.c_{_hash8('a.b_c')}"
    for order in ([squatter, "a.b_c", "a_b.c"], ["a_b.c", "a.b_c", squatter]):
        table = tool_names(order)
        assert table["a.b_c"] == f"a_b_c_{_hash8('a.b_c')}"
        assert table[squatter] == f"a_b_c_{_hash8('a.b_c')}_{_hash8(squatter)}"
        assert len(set(table.values())) == 3


def test_a_call_by_tool_name_or_mesh_name_finds_the_same_tool() -> None:
    """The bridge maps a called name back through the same table; the old dotted name still works."""
    tools = {t.name: t for t in tools_from_registry(_registry(COLLIDING))}
    by_tool = find_tool(tools, f"a_b_c_{_hash8('a.b_c')}")
    assert by_tool is not None and (by_tool.service, by_tool.action) == ("a", "b_c")
    assert find_tool(tools, "a.b_c") is by_tool
    assert find_tool(tools, "a_b_c") is None and find_tool(tools, "nope.nope") is None


def test_the_same_registry_gives_the_same_tools() -> None:
    """Tools do not depend on the registry's key order (clients may cache them)."""
    reordered = {k: REGISTRY[k] for k in reversed(list(REGISTRY))}
    assert tools_from_registry(reordered) == tools_from_registry(REGISTRY)


def test_description_and_schema_come_from_the_registry() -> None:
    """An object schema is the inputSchema as it is; the description is the action's."""
    put = next(t for t in tools_from_registry(REGISTRY) if t.name == "kv_put")
    assert put.description == "Store."
    assert put.input_schema == REGISTRY["kv"]["actions"]["put"]["schema"]
    assert put.payload({"key": "a"}) == {"key": "a"}


def test_an_action_without_schema_or_description_still_makes_a_usable_tool() -> None:
    """No schema becomes an open object schema; no description names the action."""
    delete = next(t for t in tools_from_registry(REGISTRY) if t.name == "kv_delete")
    assert delete.input_schema == {"type": "object"}
    assert delete.description == "The mesh action kv.delete."


def test_a_non_object_schema_is_wrapped_in_a_payload_argument() -> None:
    """MCP arguments are an object, so a string payload travels as {"payload": ...}."""
    echo = next(t for t in tools_from_registry(REGISTRY) if t.name == "echo_echo")
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
    """Globs match mesh names: only included names are kept, and an excluded name never is."""
    chosen = tools_from_registry(REGISTRY, Selection(include=("kv.*",), exclude=("*.delete",)))
    assert [t.mesh_name for t in chosen] == ["kv.get", "kv.put"]
    assert [t.mesh_name for t in tools_from_registry(REGISTRY, Selection(exclude=("kv.*",)))] == ["echo.echo"]


def test_selection_never_renames_a_tool() -> None:
    """Names are given over every action the bridge sees, so excluding one collider keeps the other's hash."""
    chosen = tools_from_registry(_registry(COLLIDING), Selection(exclude=("a_b.c",)))
    assert f"a_b_c_{_hash8('a.b_c')}" in {t.name for t in chosen}
