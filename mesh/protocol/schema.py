"""Payload validation against an action's JSON Schema.

Rules of this module:

* Schemas are compiled once, when an action is declared (fastjsonschema turns them
  into Python code, well under a microsecond per small payload).
* A refused payload raises `ValidationFailedError` whose `details["field"]` is the
  dotted path of the offending field (`"a.b"`, or `""` for the payload itself), so
  the caller can point at it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import fastjsonschema

from .errors import ConfigurationError, ValidationFailedError

__all__ = ["PayloadValidator", "compile_schema"]

PayloadValidator = Callable[[Any], None]


def _field_of(exc: fastjsonschema.JsonSchemaValueException) -> str:
    parts = [str(p) for p in (exc.path or [])][1:]  # drop the leading "data"
    value = exc.value
    if exc.rule == "required" and isinstance(value, Mapping):
        missing = [k for k in exc.rule_definition or () if k not in value]
        if missing:
            parts.append(str(missing[0]))
    elif exc.rule == "additionalProperties" and isinstance(value, Mapping):
        allowed = (exc.definition or {}).get("properties", {})
        extra = [k for k in value if k not in allowed]
        if extra:
            parts.append(str(extra[0]))
    return ".".join(parts)


def compile_schema(schema: Mapping[str, Any]) -> PayloadValidator:
    """A validator for `schema`.

    Raises:
        ConfigurationError: the schema itself is not valid JSON Schema.
    """
    try:
        check = fastjsonschema.compile(dict(schema))
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise ConfigurationError(f"invalid JSON Schema: {exc}") from None

    def validate(payload: Any) -> None:
        try:
            check(payload)
        except fastjsonschema.JsonSchemaValueException as exc:
            field = _field_of(exc)
            problem = exc.message.replace("data.", "", 1).replace("data ", "payload ", 1)
            raise ValidationFailedError(
                f"{field or 'payload'}: {problem}" if field else problem,
                details={"field": field, "rule": exc.rule},
            ) from None

    return validate
