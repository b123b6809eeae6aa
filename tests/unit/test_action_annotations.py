"""What an action says it does (read-only, destructive, idempotent, open-world) and the
shape of its result: declared with `@node.action`, carried by registration and
`mesh.services`, mapped to MCP hints and outputSchema; the node holds results to it.

Sans-IO: the node SDK, the broker core and the bridge's tool mapping, no sockets.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from mesh.broker import Broker
from mesh.mcp.tools import tools_from_registry
from mesh.node import Node
from mesh.node.core import Work
from mesh.protocol import (
    MAX_SCHEMA_BYTES,
    ConfigurationError,
    ErrorCode,
    MessageTooLargeError,
    MessageType,
    ValidationFailedError,
    unpack_header,
)
from mesh.testing.frames import (
    NODE_A,
    command_frames,
    error_of,
    header_of,
    node_system,
    only,
    payload_of,
)


def declared(**hints: Any) -> Node:
    n = Node("t")

    @n.action("svc", "act", **hints)
    def act(payload: Any) -> Any:
        return payload

    return n


def test_declared_hints_travel_from_the_decorator_to_mesh_services_and_mcp() -> None:
    """Invariant: each declared hint reaches mesh.services unchanged and MCP under its own name."""
    node = declared(read_only=True, open_world=False, idempotent=True)
    broker = Broker()
    out = only(broker.node_message(NODE_A, node_system("register", node.registration(), id="r"), 1.0))
    assert header_of(out[2]).type is MessageType.RESPONSE, out
    entry = broker.registry.describe()["svc"]["actions"]["act"]
    assert (entry["read_only"], entry["destructive"], entry["open_world"], entry["idempotent"]) == (
        True, False, False, True)
    (tool,) = tools_from_registry(broker.registry.describe())
    assert tool.annotations() == {"readOnlyHint": True, "destructiveHint": False, "openWorldHint": False,
                                  "idempotentHint": True}


def test_undeclared_hints_stay_unknown() -> None:
    """Invariant: a hint the node did not declare is absent everywhere, so MCP clients keep
    their cautious defaults (destructive, open world) instead of a claim nobody made."""
    node = declared()
    spec = node.registration()["services"]["svc"]["actions"]["act"]
    assert not {"read_only", "destructive", "open_world"} & spec.keys()
    (tool,) = tools_from_registry(node.registration()["services"])
    assert tool.annotations() == {}


@pytest.mark.parametrize(("hints", "field"), [
    ({"read_only": "yes"}, "read_only"),
    ({"open_world": 1}, "open_world"),
    ({"read_only": True, "destructive": True}, "destructive"),
])
def test_the_decorator_refuses_bad_hints_naming_the_field(hints: dict[str, Any], field: str) -> None:
    """Invariant: what a broker would refuse is refused when the action is declared."""
    with pytest.raises(ValidationFailedError) as caught:
        declared(**hints)
    assert caught.value.details["field"] == f"services.svc.actions.act.{field}"


# ------------------------------------------------------------------ result schemas

RESULT = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def served(result: Any, result_schema: Any = RESULT) -> Node:
    """A node whose svc.act returns `result` and declares `result_schema`."""
    n = Node("t")

    @n.action("svc", "act", result_schema=result_schema)
    def act(payload: Any) -> Any:
        return result

    return n


def run_command(node: Node) -> list[bytes]:
    """The node's reply frames to one svc.act command, as the node's loop would send them."""
    header, payload = command_frames("svc", "act", id="c1", now=time.time(), payload={})
    return node.execute(Work(b"env", unpack_header(header), payload, node.actions[("svc", "act")]))


def test_a_result_that_breaks_its_schema_is_answered_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Invariant: a caller never receives a result that breaks the declared result schema:
    it gets INTERNAL (3003) naming the field, and the node's own log says why as an error
    (the result's values appear in neither)."""
    with caplog.at_level(logging.ERROR, logger="mesh.node"):
        frames = run_command(served({"n": "secret-value"}))
    err = error_of(frames)
    assert err.code == ErrorCode.INTERNAL and err.details["result_field"] == "n", err
    assert err.details["cause"] == "handler_result"  # the handler's own doing, not a crash
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "svc.act" in record.getMessage() and "result_schema" in record.getMessage()
    assert "secret-value" not in record.getMessage() + err.message


def test_a_result_that_matches_its_schema_is_sent() -> None:
    """Invariant: the check lets a conforming result through unchanged."""
    frames = run_command(served({"n": 3}))
    assert header_of(frames).type is MessageType.RESPONSE and payload_of(frames) == {"n": 3}


def test_the_result_schema_travels_to_mesh_services_and_mcp_output_schema() -> None:
    """Invariant: a declared result schema reaches mesh.services unchanged and becomes the
    tool's outputSchema; a non-object one is wrapped as {"result": ...}, like its content."""
    node = served(1, {"type": "integer"})
    broker = Broker()
    broker.node_message(NODE_A, node_system("register", node.registration(), id="r"), 1.0)
    entry = broker.registry.describe()["svc"]["actions"]["act"]
    assert entry["result_schema"] == {"type": "integer"}
    (tool,) = tools_from_registry(broker.registry.describe())
    assert tool.output_schema == {"type": "object", "properties": {"result": {"type": "integer"}},
                                  "required": ["result"]}
    assert tool.structured(1) == {"result": 1}
    (plain,) = tools_from_registry(served({"n": 1}).registration()["services"])
    assert plain.output_schema == RESULT and plain.structured({"n": 1}) == {"n": 1}


@pytest.mark.parametrize(("result_schema", "error"), [
    ({"type": 12}, ConfigurationError),
    ({"$ref": "http://example.com/s"}, ConfigurationError),
    ({"description": "x" * MAX_SCHEMA_BYTES}, MessageTooLargeError),
])
def test_the_decorator_refuses_a_result_schema_the_broker_would(result_schema: Any, error: type) -> None:
    """Invariant: a result schema is held to the payload schema's rules and size limit."""
    with pytest.raises(error) as caught:
        served({}, result_schema)
    assert caught.value.details["field"].startswith("services.svc.actions.act.result_schema")
