"""From the mesh registry to MCP tools and resources, and back: no I/O, no SDK.

Rules of this module:

* A tool is one `service.action` of the registry (its mesh name). Its tool name matches
  `^[a-zA-Z0-9_-]{1,64}$`, the rule Claude's and OpenAI's tool APIs enforce (they refuse
  the whole list when one name fails): the mesh name with every character outside
  `[a-zA-Z0-9_-]` (in practice the dot) replaced by `_`, so `echo.echo` is `echo_echo`.
  That can collide (`a_b.c` and `a.b_c`) or pass 64 characters (a mesh name may be
  129). Every tool whose name is shared or too long, never only the later one, gets
  `_` and the first 8 hex digits of the SHA-256 of its mesh name, after its name cut to
  fit 64; if that is still shared, the tools that share it at the lowest level go to 16
  digits, and tools still sharing a name then are left out. A name so depends only on the
  set of mesh names the bridge sees, never on the order nodes registered in; a node that
  joins can rename a tool it collides with (that is why `tools/list_changed` is sent).
* The mesh name stays visible (the tool's `title` and `_meta["mesh/name"]`), and a call
  by the mesh name (`echo.echo`) still reaches the tool, so older clients keep working.
* Tools come sorted by tool name, so a client that caches the list sees no change when
  nothing changed.
* `--include` / `--exclude` are shell globs over mesh names (`kv.*`, `*.delete`), as
  before the tool names became portable. With no include pattern every tool is included;
  an exclude pattern always wins. Names are given before selection, so a pattern never
  renames a tool.
* The `mesh` service (the broker's own) is never a tool: the registry does not list it.
* A mesh action without a schema accepts any payload; MCP needs an object schema, so
  such a tool gets `{"type": "object"}`. An action whose schema is not an object (a
  string, say) gets its payload wrapped: the tool takes `{"payload": ...}`, and the
  schema's `$ref`s are moved along with it, so they still resolve.
* An action that declares a result schema gets it as the tool's `outputSchema`, and its
  `structuredContent` is the result itself. MCP needs an object there too, so a result
  schema that is not an object is wrapped the same way (`{"result": ...}`), and so is its
  structured content. The node checks each result against its schema before replying.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..protocol import rebase_refs

__all__ = [
    "ToolSpec", "Selection", "tools_from_registry", "selected_registry", "as_text", "REGISTRY_URI", "schema_uri",
    "WRAPPED_KEY", "tool_names", "find_tool",
]

REGISTRY_URI: Final = "mesh://services"
WRAPPED_KEY: Final = "payload"
_MAX_NAME: Final = 64
_HASH_DIGITS: Final = (0, 8, 16)  # by level: the naive name, then ever longer hashes
_OUTSIDE = re.compile(r"[^a-zA-Z0-9_-]")


def schema_uri(service: str) -> str:
    """The resource URI of one service's actions and schemas."""
    return f"mesh://services/{service}"


RESULT_KEY: Final = "result"  # structuredContent {"result": ...} of a result that is not an object
# A mesh action's hint (mesh.protocol.registration.HINTS) -> its name in MCP's ToolAnnotations.
_MCP_HINTS: Final = {"read_only": "readOnlyHint", "destructive": "destructiveHint", "open_world": "openWorldHint"}


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One mesh action as an MCP tool."""

    name: str
    service: str
    action: str
    description: str
    input_schema: dict[str, Any]
    wrapped: bool = False  # the tool's arguments are {"payload": <the mesh payload>}
    idempotent: bool = False
    # The action's declared `read_only` / `destructive` / `open_world` (only those declared).
    hints: dict[str, bool] = field(default_factory=dict)
    output_schema: dict[str, Any] | None = None  # from the action's result schema
    result_wrapped: bool = False  # structuredContent is {"result": <the mesh result>}

    def structured(self, result: Any) -> dict[str, Any]:
        """The tool result's structuredContent for a mesh result (matching `output_schema`)."""
        return {RESULT_KEY: result} if self.result_wrapped or not isinstance(result, dict) else result

    def annotations(self) -> dict[str, bool]:
        """The MCP ToolAnnotations hints (camelCase) this tool truly has.

        Only what the node declared is given: an undeclared hint is left out, so a client
        assumes MCP's cautious default (destructive, open world). `idempotentHint` is
        given only when true, since a mesh action is not idempotent unless it says so.
        """
        out = {_MCP_HINTS[k]: v for k, v in self.hints.items() if k in _MCP_HINTS}
        if self.idempotent:
            out["idempotentHint"] = True
        return out

    @property
    def mesh_name(self) -> str:
        """`service.action`: the tool's title, and a name a call may still use."""
        return f"{self.service}.{self.action}"

    def payload(self, arguments: Mapping[str, Any] | None) -> Any:
        """The mesh payload for the tool's arguments."""
        args = dict(arguments or {})
        return args.get(WRAPPED_KEY) if self.wrapped else args


@dataclass(frozen=True, slots=True)
class Selection:
    """Which tools to expose: shell globs over tool names."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def admits(self, name: str) -> bool:
        """Whether the tool `name` is exposed."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include)


def _object_schema(schema: Mapping[str, Any], key: str) -> tuple[dict[str, Any], bool]:
    """An object schema for a mesh schema (MCP's rule for input and output), and whether
    it had to wrap the value as `{key: ...}`."""
    if not schema:
        return {"type": "object"}, False
    if schema.get("type") == "object":
        return dict(schema), False
    inner = rebase_refs(schema, f"/properties/{key}")
    return {"type": "object", "properties": {key: inner}, "required": [key]}, True


def _portable(mesh_name: str, level: int) -> str:
    """The tool name of `mesh_name` at a level: naive, or cut and given a hash."""
    naive = _OUTSIDE.sub("_", mesh_name)
    digits = _HASH_DIGITS[level]
    if not digits:
        return naive
    digest = hashlib.sha256(mesh_name.encode("utf-8")).hexdigest()[:digits]
    return f"{naive[:_MAX_NAME - digits - 1]}_{digest}"


def tool_names(mesh_names: Iterable[str]) -> dict[str, str]:
    """The tool name of each mesh name: portable, unique, and independent of order.

    Args:
        mesh_names: every `service.action` the bridge sees (before selection).

    Returns:
        mesh name -> tool name matching `^[a-zA-Z0-9_-]{1,64}$`; a mesh name whose tool
        name is still shared with 16 hex digits of hash is left out.
    """
    level = {m: 0 if len(_portable(m, 0)) <= _MAX_NAME else 1 for m in set(mesh_names)}
    while True:
        groups: dict[str, list[str]] = {}
        for m, lv in level.items():
            groups.setdefault(_portable(m, lv), []).append(m)
        bump: set[str] = set()
        for members in groups.values():
            lowest = min(level[m] for m in members)
            if len(members) > 1 and lowest < len(_HASH_DIGITS) - 1:
                bump.update(m for m in members if level[m] == lowest)
        if not bump:
            return {ms[0]: name for name, ms in groups.items() if len(ms) == 1}
        for m in bump:
            level[m] += 1


def find_tool(tools: Mapping[str, ToolSpec], name: str) -> ToolSpec | None:
    """The tool a call names: by its tool name, else by its mesh name (`echo.echo`)."""
    found = tools.get(name)
    if found is None and "." in name:
        found = next((t for t in tools.values() if t.mesh_name == name), None)
    return found


def _description(service: str, action: str, text: str) -> str:
    text = text.strip()
    return text or f"The mesh action {service}.{action}."


def tools_from_registry(registry: Mapping[str, Any], selection: Selection = Selection()) -> list[ToolSpec]:
    """The tools for a `mesh.services` answer, sorted by name.

    Args:
        registry: service -> {"actions": {action -> {"description", "schema", ...}}}.
        selection: the include and exclude patterns.

    Returns:
        One `ToolSpec` per selected action, named by `tool_names`; entries that are
        not shaped like the registry's (a newer broker's, say) are skipped rather than guessed at.
    """
    names = tool_names(
        f"{service}.{action}"
        for service, entry in registry.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("actions"), Mapping)
        for action in entry["actions"]
    )
    out: list[ToolSpec] = []
    for service, entry in registry.items():
        actions = entry.get("actions") if isinstance(entry, Mapping) else None
        if not isinstance(actions, Mapping):
            continue
        for action, spec in actions.items():
            mesh_name = f"{service}.{action}"
            name = names.get(mesh_name)
            if name is None or not isinstance(spec, Mapping) or not selection.admits(mesh_name):
                continue
            raw_schema = spec.get("schema")
            schema, wrapped = _object_schema(raw_schema if isinstance(raw_schema, Mapping) else {}, WRAPPED_KEY)
            raw_result = spec.get("result_schema")
            output, result_wrapped = (_object_schema(raw_result, RESULT_KEY) if isinstance(raw_result, Mapping)
                                      else (None, False))
            desc = spec.get("description")
            out.append(
                ToolSpec(
                    name=name,
                    service=service,
                    action=action,
                    description=_description(service, action, desc if isinstance(desc, str) else ""),
                    input_schema=schema,
                    wrapped=wrapped,
                    idempotent=spec.get("idempotent") is True,
                    hints={k: v for k in _MCP_HINTS if isinstance(v := spec.get(k), bool)},
                    output_schema=output,
                    result_wrapped=result_wrapped,
                )
            )
    out.sort(key=lambda t: t.name)
    return out


def selected_registry(registry: Mapping[str, Any], tools: Iterable[ToolSpec]) -> dict[str, Any]:
    """The part of the registry the tools cover (what the resources show)."""
    keep: dict[str, set[str]] = {}
    for t in tools:
        keep.setdefault(t.service, set()).add(t.action)
    out: dict[str, Any] = {}
    for service in sorted(keep):
        entry = registry[service]
        out[service] = {**entry, "actions": {a: entry["actions"][a] for a in sorted(keep[service])}}
    return out


def as_text(value: Any, *, strict: bool = True) -> str:
    """A mesh result as the text of a tool result: JSON, bytes shown as hex.

    MessagePack carries NaN and the infinities; JSON has no way to write them (Python's
    `json` writes `NaN`, which JSON parsers refuse, and the SDK then sends `null` as the
    structured content: two different answers in one result). So a result holding one is
    refused here, and only diagnostics (`strict=False`: error details) let them through,
    where they end up as `null`.

    Raises:
        ValueError: `strict` and `value` holds NaN or an infinity.
    """
    return json.dumps(value, ensure_ascii=False, default=_jsonable, sort_keys=False, allow_nan=not strict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return repr(value)
