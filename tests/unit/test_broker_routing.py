"""How the broker core routes commands to nodes and replies back to clients (sans-IO)."""

from __future__ import annotations

import pytest

from mesh.broker import Broker, BrokerConfig, Side
from mesh.protocol import ErrorCode, MessageType, ValidationFailedError, decode_header
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    NODE_B,
    command_frames,
    dispatched_ids,
    error_of,
    error_reply,
    header_of,
    node_system,
    only,
    payload_of,
    register,
    registration,
    reply,
    system,
)


@pytest.fixture
def broker() -> Broker:
    return Broker(BrokerConfig(name="b1", queue_limit=4))


def test_command_is_dispatched_to_node_offering_action(broker: Broker) -> None:
    """A command goes to the node offering it, enveloped with the client's identity."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"kv": ["get"]})
    frames = command_frames("echo", "say", id="c1", payload={"text": "hi"})
    side, ident, out = only(broker.client_message(CLIENT, frames, 1.0))
    assert (side, ident) == (Side.NODE, NODE_A)
    assert out[0] == CLIENT
    assert header_of(out).id == "c1"
    assert payload_of(out) == {"text": "hi"}


def test_dispatch_forwards_the_same_bytes_objects(broker: Broker) -> None:
    """Header and payload frames reach the node as the very objects the client sent."""
    register(broker, NODE_A, {"echo": ["say"]})
    frames = command_frames("echo", "say", payload=b"x" * 1000)
    _, _, out = only(broker.client_message(CLIENT, frames, 1.0))
    assert out[1] is frames[0]
    assert out[2] is frames[1]


def test_node_reply_goes_back_to_its_client_untouched(broker: Broker) -> None:
    """The node's reply reaches the client that sent the command, same bytes objects."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    completed = broker.counters["completed"]  # NODE_A's mesh.register
    _, _, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    _, _, d2 = only(broker.client_message(CLIENT_B, command_frames("echo", "say", id="c1"), 1.0))
    r2 = reply(d2, {"to": "b"})
    side, ident, out = only(broker.node_message(NODE_A, r2, 2.0))
    assert (side, ident) == (Side.CLIENT, CLIENT_B)
    assert out[0] is r2[1] and out[1] is r2[2]
    r1 = reply(d1, {"to": "a"})
    side, ident, out = only(broker.node_message(NODE_A, r1, 2.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert header_of(out).correlation_id == "c1"
    assert payload_of(out) == {"to": "a"}
    assert broker.counters["completed"] == completed + 2


def test_node_error_reply_goes_back_and_counts_as_failed(broker: Broker) -> None:
    """A node's error answer is forwarded to the client and the command ends failed."""
    register(broker, NODE_A, {"echo": ["say"]})
    _, _, d = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    r = error_reply(d, ValidationFailedError("text: required", details={"field": "text"}))
    side, ident, out = only(broker.node_message(NODE_A, r, 2.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert out[0] is r[1]
    assert error_of(out).code == ErrorCode.VALIDATION_FAILED
    assert broker.counters["failed"] == 1
    assert not broker.commands


def test_least_loaded_node_is_picked_first(broker: Broker) -> None:
    """With one node busier (by in-flight / capacity), the other gets the command."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=4)
    register(broker, NODE_B, {"echo": ["say"]}, capacity=1)
    out = broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0)
    first = only(out)[1]
    out = broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0)
    second = only(out)[1]
    assert {first, second} == {NODE_A, NODE_B}
    # A now has load 1/4 or 0/4, B is full or empty; the next three all go to A.
    for i in range(3):
        out = broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{3 + i}"), 1.0)
        assert only(out)[1] == NODE_A
    assert broker.registry.nodes[NODE_A].in_flight == 4
    assert broker.registry.nodes[NODE_B].in_flight == 1


def test_two_nodes_share_concurrent_load(broker: Broker) -> None:
    """Concurrent commands spread evenly over two equal nodes."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=3)
    register(broker, NODE_B, {"echo": ["say"]}, capacity=3)
    targets = [
        only(broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), 1.0))[1]
        for i in range(6)
    ]
    assert targets.count(NODE_A) == 3 and targets.count(NODE_B) == 3
    # Never two in a row to the same node while loads are equal.
    assert all(a != b for a, b in zip(targets, targets[1:], strict=False))


def test_equally_loaded_nodes_take_turns_after_a_full_round(broker: Broker) -> None:
    """Once each node has been picked, sequential commands to idle nodes alternate."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"echo": ["say"]})
    # Prime: two concurrent commands use both nodes once.
    d = [broker.client_message(CLIENT, command_frames("echo", "say", id=f"p{i}"), 1.0)[0] for i in range(2)]
    for _, node, frames in d:
        broker.node_message(node, reply(frames), 1.5)
    targets = []
    for i in range(4):
        _, node, frames = only(broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), 2.0))
        targets.append(node)
        broker.node_message(node, reply(frames), 2.5)
    assert targets in ([NODE_A, NODE_B, NODE_A, NODE_B], [NODE_B, NODE_A, NODE_B, NODE_A])


def test_equally_loaded_idle_nodes_take_turns_from_the_start(broker: Broker) -> None:
    """Sequential commands (each answered before the next) alternate between two idle nodes."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"echo": ["say"]})
    targets = []
    for i in range(4):
        _, node, frames = only(broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), 1.0))
        targets.append(node)
        broker.node_message(node, reply(frames), 1.5)
    assert targets == [NODE_A, NODE_B, NODE_A, NODE_B]


def test_capacity_is_never_exceeded_and_queue_drains_on_reply(broker: Broker) -> None:
    """With capacity 2 the third command waits, and goes out when a reply frees a slot."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0))
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c3"), 1.0) == []
    assert broker.queued == 1
    assert broker.commands[(CLIENT, "c3")].state.value == "queued"
    assert broker.registry.nodes[NODE_A].in_flight == 2
    out = broker.node_message(NODE_A, reply(d1), 2.0)
    assert [(s, i) for s, i, _ in out] == [(Side.CLIENT, CLIENT), (Side.NODE, NODE_A)]
    assert dispatched_ids(out) == ["c3"]
    assert broker.queued == 0
    assert broker.registry.nodes[NODE_A].in_flight == 2


def test_queue_drains_oldest_first_across_actions(broker: Broker) -> None:
    """A freed slot takes the oldest queued command among the actions the node offers."""
    register(broker, NODE_A, {"kv": ["get", "put"]})
    d = only(broker.client_message(CLIENT, command_frames("kv", "get", id="c1"), 1.0))[2]
    assert broker.client_message(CLIENT, command_frames("kv", "put", id="c2"), 2.0) == []
    assert broker.client_message(CLIENT, command_frames("kv", "get", id="c3"), 3.0) == []
    out = broker.node_message(NODE_A, reply(d), 4.0)
    assert dispatched_ids(out) == ["c2"]


def test_queue_limit_answers_resource_exhausted(broker: Broker) -> None:
    """Beyond `queue_limit` queued commands, the next is refused RESOURCE_EXHAUSTED."""
    register(broker, NODE_A, {"echo": ["say"]})
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c0"), 1.0))
    for i in range(4):
        assert broker.client_message(CLIENT, command_frames("echo", "say", id=f"q{i}"), 1.0) == []
    side, ident, out = only(broker.client_message(CLIENT, command_frames("echo", "say", id="over"), 1.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    err = error_of(out)
    assert err.code == ErrorCode.RESOURCE_EXHAUSTED
    assert err.retryable is True
    assert err.details["queue_limit"] == 4
    assert header_of(out).correlation_id == "over"
    assert broker.queued == 4
    assert (CLIENT, "over") not in broker.commands


def test_unknown_service_is_handler_not_found(broker: Broker) -> None:
    """A command to a service no node offers is answered HANDLER_NOT_FOUND (service)."""
    register(broker, NODE_A, {"echo": ["say"]})
    side, ident, out = only(broker.client_message(CLIENT, command_frames("nope", "say", id="c1"), 1.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    err = error_of(out)
    assert err.code == ErrorCode.HANDLER_NOT_FOUND
    assert err.retryable is False
    assert err.details == {"service": "nope", "action": "say", "missing": "service"}
    assert header_of(out).correlation_id == "c1"
    assert not broker.commands


def test_unknown_action_of_known_service_is_handler_not_found(broker: Broker) -> None:
    """A command to an action the service lacks is answered HANDLER_NOT_FOUND (action)."""
    register(broker, NODE_A, {"echo": ["say"]})
    _, _, out = only(broker.client_message(CLIENT, command_frames("echo", "shout", id="c1"), 1.0))
    err = error_of(out)
    assert err.code == ErrorCode.HANDLER_NOT_FOUND
    assert err.details["missing"] == "action"


def test_resent_command_in_flight_is_not_dispatched_twice(broker: Broker) -> None:
    """A client resending a command id still in flight gets one dispatch and one answer."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    frames = command_frames("echo", "say", id="c1")
    d = only(broker.client_message(CLIENT, frames, 1.0))[2]
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.5) == []
    assert broker.counters["duplicates"] == 1
    assert broker.registry.nodes[NODE_A].in_flight == 1
    assert only(broker.node_message(NODE_A, reply(d), 2.0))[1] == CLIENT


def test_resent_queued_command_is_not_queued_twice(broker: Broker) -> None:
    """A resend of a queued command id does not add a second queue entry."""
    register(broker, NODE_A, {"echo": ["say"]})
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0) == []
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.1) == []
    assert broker.queued == 1


def test_same_id_from_two_clients_are_two_commands(broker: Broker) -> None:
    """Command ids are per client: the same id from another client is routed too."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    only(broker.client_message(CLIENT_B, command_frames("echo", "say", id="c1"), 1.0))
    assert broker.registry.nodes[NODE_A].in_flight == 2


def test_reply_from_other_node_is_not_forwarded(broker: Broker) -> None:
    """A node cannot answer a command that was dispatched to another node."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"kv": ["get"]})
    d = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    assert broker.node_message(NODE_B, reply(d), 2.0) == []
    assert broker.counters["unexpected_replies"] == 1
    assert broker.counters["late_replies"] == 0
    assert broker.commands[(CLIENT, "c1")].state.value == "dispatched"
    assert broker.registry.nodes[NODE_A].in_flight == 1
    assert broker.registry.nodes[NODE_B].in_flight == 0
    # The right node's reply still goes through.
    assert only(broker.node_message(NODE_A, reply(d), 3.0))[:2] == (Side.CLIENT, CLIENT)


def test_ping_is_answered_by_the_broker(broker: Broker) -> None:
    """`mesh.ping` from a client is answered by the broker itself."""
    h, p = system(broker, CLIENT, "ping", now=7.0)
    assert h.type is MessageType.RESPONSE
    assert p == {"pong": True, "broker": "b1", "time": 7.0, "events": None, "instance": broker.events.epoch}


def test_services_lists_every_action_with_schema_and_description(broker: Broker) -> None:
    """`mesh.services` lists each service's actions with description, schema and node count."""
    schema = {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}
    register(
        broker,
        NODE_A,
        {"kv": {"get": {"description": "read a key", "schema": schema, "idempotent": True},
                "put": {"description": "write a key"}}},
    )
    register(broker, NODE_B, {"kv": ["get", "put"], "echo": ["say"]})
    h, p = system(broker, CLIENT, "services")
    assert h.type is MessageType.RESPONSE
    assert p == {
        "echo": {
            "nodes": 1,
            "actions": {"say": {"description": "echo.say", "schema": {}, "idempotent": False, "exactly_once": False}},
        },
        "kv": {
            "nodes": 2,
            "actions": {
                "get": {"description": "read a key", "schema": schema, "idempotent": True, "exactly_once": False},
                "put": {"description": "write a key", "schema": {}, "idempotent": False, "exactly_once": False},
            },
        },
    }


def test_stats_reports_counters_and_sizes(broker: Broker) -> None:
    """`mesh.stats` answers with the broker's counters, in-flight, queued, nodes and clients."""
    register(broker, NODE_A, {"echo": ["say"]})
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    h, p = system(broker, CLIENT_B, "stats", now=2.0)
    assert h.type is MessageType.RESPONSE
    assert p["in_flight"] == 1 and p["queued"] == 0 and p["nodes"] == 1 and p["clients"] == 2
    assert p["counters"]["dispatched"] == 1


def test_system_command_answer_correlates_to_its_id(broker: Broker) -> None:
    """A system command's answer carries the command's id as correlation id."""
    out = broker.client_message(CLIENT, command_frames("mesh", "ping", id="p1"), 1.0)
    assert header_of(only(out)[2]).correlation_id == "p1"


def test_unknown_system_action_is_handler_not_found(broker: Broker) -> None:
    """`mesh.nope` is answered HANDLER_NOT_FOUND."""
    h, _ = system(broker, CLIENT, "nope")
    assert h.error is not None and h.error.code == ErrorCode.HANDLER_NOT_FOUND


@pytest.mark.parametrize("action", ["register", "unregister", "heartbeat"])
def test_node_only_system_actions_are_refused_from_clients(broker: Broker, action: str) -> None:
    """A client cannot register, unregister or heartbeat as a node: ACCESS_DENIED."""
    register(broker, CLIENT, {"echo": ["say"]})  # a node that happens to share the identity
    failed = broker.counters["failed"]
    payload = registration({"evil": ["steal"]}) if action == "register" else {}
    h, _ = system(broker, CLIENT, action, payload)
    assert h.type is MessageType.ERROR
    assert h.error is not None and h.error.code == ErrorCode.ACCESS_DENIED
    assert h.error.details == {"action": action}
    assert not broker.registry.has_service("evil")
    assert broker.registry.offers("echo", "say")
    assert broker.counters["failed"] == failed + 1


def test_node_heartbeat_and_ping(broker: Broker) -> None:
    """Nodes get `mesh.heartbeat` (known or not) and `mesh.ping` answers with envelope b""."""
    out = broker.node_message(NODE_A, node_system("heartbeat", {}), 1.0)
    side, ident, frames = only(out)
    assert (side, ident, frames[0]) == (Side.NODE, NODE_A, b"")
    assert payload_of(frames) == {"known": False}
    register(broker, NODE_A, {"echo": ["say"]})
    assert payload_of(only(broker.node_message(NODE_A, node_system("heartbeat", {}), 2.0))[2]) == {"known": True}
    assert payload_of(only(broker.node_message(NODE_A, node_system("ping"), 3.0))[2])["pong"] is True
    assert broker.registry.nodes[NODE_A].last_seen == 3.0


def test_registration_answer_names_services(broker: Broker) -> None:
    """`mesh.register` answers with the registered services, the broker's name and its size limit."""
    payload = registration({"kv": ["get"], "echo": ["say"]})
    out = broker.node_message(NODE_A, node_system("register", payload), 1.0)
    side, ident, frames = only(out)
    assert (side, ident) == (Side.NODE, NODE_A)
    assert frames[0] == b""
    answer = payload_of(frames)
    assert answer["registered"] == ["echo", "kv"]
    assert answer["broker"] == "b1"
    assert answer.get("max_message_bytes", broker.config.max_message_bytes) == broker.config.max_message_bytes
    assert broker.counters["registrations"] == 1


def test_unregister_stops_new_dispatches(broker: Broker) -> None:
    """After `mesh.unregister` the node's services are gone for new commands."""
    register(broker, NODE_A, {"echo": ["say"]})
    out = broker.node_message(NODE_A, node_system("unregister", {}), 1.0)
    assert payload_of(only(out)[2]) == {"unregistered": True}
    _, _, frames = only(broker.client_message(CLIENT, command_frames("echo", "say"), 2.0))
    assert error_of(frames).code == ErrorCode.HANDLER_NOT_FOUND


def test_unregistering_node_still_answers_its_running_commands(broker: Broker) -> None:
    """A node that unregisters to stop gracefully gets its in-flight replies forwarded."""
    register(broker, NODE_A, {"echo": ["say"]})
    d = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    broker.node_message(NODE_A, node_system("unregister", {}), 2.0)
    out = broker.node_message(NODE_A, reply(d), 3.0)
    assert [(s, i) for s, i, _ in out] == [(Side.CLIENT, CLIENT)]


def test_reregistered_node_still_answers_its_running_commands(broker: Broker) -> None:
    """A node registering again (same identity) keeps its in-flight commands answerable."""
    register(broker, NODE_A, {"echo": ["say"]})
    d = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    register(broker, NODE_A, {"echo": ["say"]}, now=2.0)
    out = broker.node_message(NODE_A, reply(d), 3.0)
    assert [(s, i) for s, i, _ in out] == [(Side.CLIENT, CLIENT)]
    assert broker.registry.nodes[NODE_A].in_flight == 0


def test_node_back_after_unregister_keeps_its_capacity(broker: Broker) -> None:
    """A node that unregisters and registers again while running a command never exceeds its capacity."""
    register(broker, NODE_A, {"echo": ["say"]})
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    broker.node_message(NODE_A, node_system("unregister", {}), 2.0)
    assert register(broker, NODE_A, {"echo": ["say"]}, now=3.0) == []
    node = broker.registry.nodes[NODE_A]
    assert node.owed is broker.node_links[NODE_A].pending_commands
    assert node.owed == {(CLIENT, "c1")}
    assert node.in_flight == 1
    # A still owes c1 (capacity 1), so c2 waits until that reply comes.
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 4.0) == []
    out = broker.node_message(NODE_A, reply(d1), 5.0)
    assert [(s, i) for s, i, _ in out] == [(Side.CLIENT, CLIENT), (Side.NODE, NODE_A)]
    assert dispatched_ids(out) == ["c2"]
    assert node.in_flight == 1
    # A now runs c2, so c3 must wait.
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c3"), 6.0) == []


def test_new_node_takes_queued_commands_on_registration(broker: Broker) -> None:
    """A node that registers while commands are queued for its action gets them at once, oldest first."""
    register(broker, NODE_A, {"echo": ["say"]})
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    for i in range(2, 5):
        assert broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), float(i)) == []
    out = register(broker, NODE_B, {"echo": ["say"]}, capacity=2, now=5.0)
    assert {(s, i) for s, i, _ in out} == {(Side.NODE, NODE_B)}
    assert dispatched_ids(out) == ["c2", "c3"]
    assert broker.queued == 1
    assert [c.id for c in broker.queues[("echo", "say")]] == ["c4"]
    assert broker.registry.nodes[NODE_B].in_flight == 2


def test_registration_dispatch_frames_decode(broker: Broker) -> None:
    """Every dispatch header the node receives decodes as the client's command."""
    register(broker, NODE_A, {"echo": ["say"]})
    frames = command_frames("echo", "say", id="c1", deadline=99.0)
    _, _, out = only(broker.client_message(CLIENT, frames, 1.0))
    h = decode_header(out[1])
    assert (h.type, h.service, h.action, h.deadline) == (MessageType.COMMAND, "echo", "say", 99.0)
