"""The `echo` service: the smallest real node, for trying the mesh and testing it.

`echo.echo` hands the payload back untouched, so a client can check a round trip through
the broker value for value; `echo.reverse` changes its input, which shows the handler
really ran rather than a reply being replayed.
"""

from __future__ import annotations

from typing import Any, Final

from mesh.node import Node

__all__ = ["node"]

ECHO_SCHEMA: Final = {
    "type": "object",
    "description": "Any object, for example {\"text\": \"hi\"}; it comes back unchanged.",
}
ECHO_RESULT: Final = {"type": "object", "description": "The payload, unchanged."}
REVERSE_RESULT: Final = {
    "type": "object",
    "properties": {"text": {"type": "string", "description": "The text, reversed."}},
    "required": ["text"],
    "additionalProperties": False,
}
REVERSE_SCHEMA: Final = {
    "type": "object",
    "properties": {"text": {"type": "string", "description": "The text to reverse."}},
    "required": ["text"],
    "additionalProperties": False,
}


def node() -> Node:
    """The echo node; it has nothing to configure.

    Its handlers are `async` because they never block: they run on the node's event loop
    without a thread hop, the cheapest path a command can take.

    Returns:
        A `Node` named "echo" offering `echo.echo` and `echo.reverse`.
    """
    n = Node("echo")

    @n.action(
        "echo", "echo", schema=ECHO_SCHEMA, idempotent=True, read_only=True, open_world=False,
        result_schema=ECHO_RESULT,
        description="Return the payload object unchanged.",
    )
    async def echo(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @n.action(
        "echo", "reverse", schema=REVERSE_SCHEMA, idempotent=True, read_only=True, open_world=False,
        result_schema=REVERSE_RESULT,
        description="Return the text with its characters in reverse order.",
    )
    async def reverse(payload: dict[str, Any]) -> dict[str, str]:
        return {"text": payload["text"][::-1]}

    return n
