"""Payload schemas: what a node may register, and payload validation against them.

Rules of this module:

* A payload schema is JSON Schema draft-07, the draft fastjsonschema validates with.
  `check_schema` is the one test a schema passes before anyone keeps or compiles it:
  the node SDK when an action is declared, the broker when a node registers, the MCP
  bridge before it compiles a tool's schema. It refuses, in this order:
  a schema over `MAX_SCHEMA_BYTES` (encoded), anything that is not JSON (non-string
  keys, bytes, NaN), nesting past `MAX_SCHEMA_DEPTH`, a `$schema` naming another draft,
  a `$id` below the root, anything the draft-07 meta-schema refuses, and a `$ref` that
  is not a JSON pointer into the same schema, does not resolve, or leads back to
  itself (a cycle, even one that would consume data). So a schema never makes a
  validator fetch a URL (fastjsonschema resolves remote `$ref`s with `urlopen`) or
  recurse forever.
* Checking never compiles the schema into code: the broker keeps schemas from peers
  it only half trusts, and code generation from them is a risk it need not take. The
  meta-schema, which is ours, is the one schema compiled for it.
* Schemas are compiled once, when an action is declared (fastjsonschema turns them
  into Python code, well under a microsecond per small payload).
* A refused payload raises `ValidationFailedError` whose `details["field"]` is the
  path of the offending field (`"a.b"`, `"tags[1]"`, or `""` for the payload itself),
  so the caller can point at it.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final
from urllib.parse import unquote

import fastjsonschema

from .codec import encode_payload
from .errors import ConfigurationError, MeshError, MessageTooLargeError, ValidationFailedError
from .metaschema import DRAFT_07, DRAFT_07_URIS
from .names import shown_key

__all__ = [
    "PayloadValidator",
    "compile_schema",
    "check_schema",
    "rebase_refs",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "MAX_REGISTRATION_BYTES",
    "MAX_ACTIONS",
    "MAX_SCHEMA_REFS",
]

PayloadValidator = Callable[[Any], None]

# One action's schema, MessagePack-encoded: a generous JSON Schema is a few KiB.
MAX_SCHEMA_BYTES: Final = 64 * 1024
# Maps and lists inside one another; also bounds the recursion of every schema walker.
MAX_SCHEMA_DEPTH: Final = 32
# A whole `mesh.register` payload (encoded) and the actions it may declare: what a
# broker keeps per node, and what bounds one node's share of `mesh.services`.
MAX_REGISTRATION_BYTES: Final = 512 * 1024
MAX_ACTIONS: Final = 1000
MAX_SCHEMA_REFS: Final = 256  # $refs in one schema: checking them costs a walk of the schema, plus their graph

# Draft-07 keywords whose value is a schema, a map of schemas, or a list of schemas
# (`items` may be a schema or a list; `dependencies` values may be lists of names).
_SUBSCHEMA: Final = ("additionalItems", "additionalProperties", "contains", "propertyNames", "not", "if", "then", "else",
                     "items")
_SCHEMA_MAPS: Final = ("properties", "patternProperties", "definitions", "dependencies")
_SCHEMA_LISTS: Final = ("allOf", "anyOf", "oneOf", "items")
_SHOWN: Final = 80  # characters of a bad $ref quoted back in a message

Path = tuple[str, ...]


def _refused(field: str, problem: str, **details: Any) -> ValidationFailedError:
    return ValidationFailedError(f"{field}: {problem}", details={"field": field, **details})


def _at(field: str, path: Path) -> str:
    return ".".join((field, *map(shown_key, path)))


@functools.cache
def _meta_validator() -> Callable[[Any], Any]:
    # Compiled on first use, not at import: 40 ms that clients never need.
    return fastjsonschema.compile(DRAFT_07, use_default=False)


def _check_meta(node: Any, field: str) -> None:
    try:
        _meta_validator()(node)
    except fastjsonschema.JsonSchemaValueException as exc:
        where = (exc.name or "data").removeprefix("data").removeprefix(".")
        problem = exc.message.removeprefix(exc.name or "").strip()
        raise _refused(f"{field}.{where}" if where else field,
                       f"is not valid draft-07 JSON Schema ({problem})", rule=exc.rule) from None


def _check_json(schema: Any, field: str) -> None:
    """Refuse what JSON cannot say, and nesting past MAX_SCHEMA_DEPTH (no recursion)."""
    stack: list[tuple[Any, int, Path]] = [(schema, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict):
            items: Iterator[tuple[Any, Any]] = iter(value.items())
        elif isinstance(value, list):
            items = ((str(i), v) for i, v in enumerate(value))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _refused(_at(field, path), "must be a finite number (JSON has no NaN or infinity)")
            continue
        elif value is None or isinstance(value, (str, int)):
            continue
        else:
            raise _refused(_at(field, path), f"is not a JSON value ({type(value).__name__})")
        if depth >= MAX_SCHEMA_DEPTH:
            raise _refused(_at(field, path), f"nests deeper than {MAX_SCHEMA_DEPTH} levels",
                           limit=MAX_SCHEMA_DEPTH)
        for key, item in items:
            if not isinstance(key, str):
                raise _refused(_at(field, path), "has a key that is not a string")
            stack.append((item, depth + 1, (*path, key)))


def _refs_under(node: Any, path: Path, field: str) -> Iterator[tuple[Path, Any]]:
    """The `$ref`s of `node` and of every schema inside it, with their paths.

    Only schema positions count: a property named "$ref" or an `enum` value is data.
    """
    stack: list[tuple[Any, Path]] = [(node, path)]
    while stack:
        schema, at = stack.pop()
        if not isinstance(schema, dict):
            continue  # a boolean schema
        if "$id" in schema and at:
            raise _refused(_at(field, (*at, "$id")), "a $id is allowed only at the root of the schema")
        if "$ref" in schema:
            yield at, schema["$ref"]
        for key in _SUBSCHEMA:
            if isinstance(schema.get(key), (dict, bool)):
                stack.append((schema[key], (*at, key)))
        for key in _SCHEMA_MAPS:
            subs = schema.get(key)
            if isinstance(subs, dict):
                stack.extend((sub, (*at, key, name)) for name, sub in subs.items())
        for key in _SCHEMA_LISTS:
            subs = schema.get(key)
            if isinstance(subs, list):
                stack.extend((sub, (*at, key, str(i))) for i, sub in enumerate(subs))


def _resolve(schema: Any, ref: Any, where: str) -> Path:
    """The path of the schema a `$ref` names: only '#' or a JSON pointer '#/a/b' to a
    place where a schema stands (under `properties`, `definitions`, `items`, ...), which
    the meta-schema check of the whole schema has already checked."""
    shown = repr(ref)[:_SHOWN]
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise _refused(where, f"must point inside the schema ('#/...'), not at {shown}")
    pointer = unquote(ref[1:])
    if not pointer:
        return ()
    if not pointer.startswith("/"):
        raise _refused(where, f"must be a JSON pointer ('#/...'), not {shown}")
    node, path, place = schema, [], "schema"  # what stands at `path`: a schema, a map or a list of them
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise _refused(where, f"{shown} does not resolve inside the schema")
        path.append(token)
        if place == "schema" and (token in _SUBSCHEMA or (token == "items" and isinstance(node, (dict, bool)))):
            place = "schema"
        elif place == "schema" and token in _SCHEMA_MAPS:
            place = "map"
        elif place == "schema" and token in _SCHEMA_LISTS:
            place = "list"
        elif place == "map" or (place == "list" and token.isdigit()):
            place = "schema"
        else:
            place = "data"
    if place != "schema" or not isinstance(node, (dict, bool)):
        raise _refused(where, f"{shown} points at something that is not a schema")
    return tuple(path)


def _check_refs(schema: Any, field: str) -> None:
    """Every `$ref` resolves inside `schema`, to a schema, and no chain of them loops.

    One walk finds every `$ref` (at most MAX_SCHEMA_REFS). A `$ref` leads to every
    `$ref` inside the schema it names; a cycle in that graph is a `$ref` cycle. The work
    is one walk of the schema plus the graph, never a walk per `$ref`, so a schema of
    nested `$ref`s costs no more than a flat one.
    """
    found = list(_refs_under(schema, (), field))
    if len(found) > MAX_SCHEMA_REFS:
        raise _refused(field, f"has more than {MAX_SCHEMA_REFS} $refs", limit=MAX_SCHEMA_REFS)
    targets = [_resolve(schema, ref, _at(field, (*at, "$ref"))) for at, ref in found]
    # The $refs inside the schema each one names (its location under the target path).
    leads = [[j for j, (at, _) in enumerate(found) if at[: len(target)] == target] for target in targets]
    state = [0] * len(found)  # 0: not seen; 1: being followed; 2: done
    for start in range(len(found)):
        if state[start]:
            continue
        stack = [(start, iter(leads[start]))]
        state[start] = 1
        while stack:
            i, rest = stack[-1]
            for j in rest:
                if state[j] == 1:
                    at, ref = found[j]
                    raise _refused(_at(field, (*at, "$ref")), f"{repr(ref)[:_SHOWN]} leads back to itself (a $ref cycle)")
                if state[j] == 0:
                    state[j] = 1
                    stack.append((j, iter(leads[j])))
                    break
            else:
                state[i] = 2
                stack.pop()


def check_schema(schema: Any, field: str = "schema") -> int:
    """Check that `schema` is a payload schema the mesh accepts (see the module rules).

    Args:
        schema: the JSON Schema, as decoded from the wire or declared by a node.
        field: how messages name it, e.g. "services.kv.actions.get.schema".

    Returns:
        Its size encoded as MessagePack.

    Raises:
        MessageTooLargeError: larger than MAX_SCHEMA_BYTES (`details.limit`).
        ValidationFailedError: not a schema the mesh accepts; `details.field` names the
            offending place inside it.
    """
    try:
        size = len(encode_payload(schema))
    except MeshError:
        raise _refused(field, "cannot be encoded (too deep, or a value MessagePack cannot carry)") from None
    if size > MAX_SCHEMA_BYTES:
        raise MessageTooLargeError(
            f"{field}: is {size} bytes encoded, limit {MAX_SCHEMA_BYTES}",
            details={"field": field, "limit": MAX_SCHEMA_BYTES, "size": size},
        )
    _check_json(schema, field)
    if isinstance(schema, dict) and "$schema" in schema:
        declared = schema["$schema"]
        if not isinstance(declared, str) or declared not in DRAFT_07_URIS:
            raise _refused(f"{field}.$schema", "payloads are validated as draft-07: "
                           f"leave $schema out or use {min(DRAFT_07_URIS)}")
    _check_meta(schema, field)
    _check_refs(schema, field)
    return size


def rebase_refs(schema: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of `schema` to nest at the JSON pointer `prefix` of another schema.

    Each `$ref` "#/..." becomes "#<prefix>/...", so that it still names the same place
    (a schema that passed `check_schema` has no other kind: "#" alone is a cycle).

    Args:
        schema: a schema that passed `check_schema`.
        prefix: where it goes, e.g. "/properties/payload".
    """
    out = copy.deepcopy(dict(schema))
    for at, ref in list(_refs_under(out, (), "schema")):
        node: Any = out
        for token in at:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if isinstance(ref, str) and ref.startswith("#/"):
            node["$ref"] = f"#{prefix}{ref[1:]}"
    return out


def _field_of(exc: fastjsonschema.JsonSchemaValueException) -> str:
    # fastjsonschema names the failing value like "data.a.b" or "data.tags[1]".
    field = (exc.name or "data").removeprefix("data").removeprefix(".")
    value = exc.value
    missing: list[str] = []
    if exc.rule == "required" and isinstance(value, Mapping):
        missing = [str(k) for k in exc.rule_definition or () if k not in value]
    elif exc.rule == "additionalProperties" and isinstance(value, Mapping):
        allowed = (exc.definition or {}).get("properties", {})
        missing = [str(k) for k in value if k not in allowed]
    if missing:
        field = f"{field}.{missing[0]}" if field else missing[0]
    return field


_PROBLEMS: Final = {"required": "is required", "additionalProperties": "is not allowed"}


def compile_schema(schema: Mapping[str, Any], field: str = "schema") -> PayloadValidator:
    """A validator for `schema`, which must pass `check_schema` first.

    Args:
        schema: the payload's JSON Schema.
        field: how messages name the schema (see `check_schema`).

    Raises:
        ConfigurationError: the schema is not one the mesh accepts (`details.field`
            names where), or fastjsonschema cannot compile it.
        MessageTooLargeError: the schema is larger than MAX_SCHEMA_BYTES.
    """
    try:
        check_schema(schema, field)
    except ValidationFailedError as exc:
        raise ConfigurationError(f"invalid JSON Schema: {exc.message}", details=exc.details) from None
    try:
        check = fastjsonschema.compile(dict(schema))
    except Exception as exc:  # noqa: BLE001 - fastjsonschema raises its own and also re/attribute errors
        raise ConfigurationError(f"invalid JSON Schema: {exc}", details={"field": field}) from None

    def validate(payload: Any) -> None:
        try:
            check(payload)
        except fastjsonschema.JsonSchemaValueException as exc:
            field = _field_of(exc)
            problem = _PROBLEMS.get(exc.rule or "") or exc.message.removeprefix(exc.name or "").strip()
            raise ValidationFailedError(
                f"{field or 'payload'}: {problem}", details={"field": field, "rule": exc.rule}
            ) from None

    return validate
