"""Payload validation against an action's JSON Schema.

Rules of this module:

* Schemas are compiled once, when an action is declared (fastjsonschema turns them
  into Python code, well under a microsecond per small payload).
* A refused payload raises `ValidationFailedError` whose `details["field"]` is the
  path of the offending field (`"a.b"`, `"tags[1]"`, or `""` for the payload itself),
  so the caller can point at it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import fastjsonschema

from .errors import ConfigurationError, ValidationFailedError

__all__ = ["PayloadValidator", "compile_schema"]

PayloadValidator = Callable[[Any], None]


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


def compile_schema(schema: Mapping[str, Any]) -> PayloadValidator:
    """A validator for `schema`.

    Raises:
        ConfigurationError: the schema itself is not valid JSON Schema.
    """
    try:
        check = fastjsonschema.compile(dict(schema))
    except Exception as exc:  # fastjsonschema raises its own and also re/attribute errors
        raise ConfigurationError(f"invalid JSON Schema: {exc}") from None

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
