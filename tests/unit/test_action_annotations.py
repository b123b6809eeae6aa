"""What an action says it does (read-only, destructive, idempotent, open-world): declared
with `@node.action`, carried by registration and `mesh.services`, mapped to MCP hints.

Sans-IO: the node SDK, the broker core and the bridge's tool mapping, no sockets.
"""

from __future__ import annotations

from typing import Any

import pytest
from frames import NODE_A, header_of, node_system, only

from mesh.broker import Broker
from mesh.mcp.tools import tools_from_registry
from mesh.node import Node
from mesh.protocol import MessageType, ValidationFailedError


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
