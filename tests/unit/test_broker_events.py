"""The broker core's side of events: publishing, acknowledgements, replay, and lifecycle events."""

from __future__ import annotations

import pytest

from mesh.broker import Broker, BrokerConfig, Side
from mesh.protocol import ErrorCode, InternalError, MessageType
from mesh.protocol.topics import CONTROL
from mesh.testing.frames import (
    CLIENT,
    NODE_A,
    NODE_B,
    command_frames,
    error_reply,
    event_frames,
    header_of,
    node_system,
    only,
    payload_of,
    published,
    register,
    system,
)


@pytest.fixture
def broker() -> Broker:
    return Broker(BrokerConfig(name="b1"))


def topics(broker: Broker) -> list[str]:
    return [h.topic for _, h, _ in published(broker)]


def test_client_event_is_acknowledged_with_its_seq_and_published(broker: Broker) -> None:
    """A client's event is answered with its sequence number and goes out to subscribers."""
    for n in (1, 2):
        side, ident, frames = only(broker.client_message(CLIENT, event_frames("orders.new", {"n": n}, id=f"e{n}"), 1.0))
        assert (side, ident) == (Side.CLIENT, CLIENT)
        h = header_of(frames)
        assert (h.type, h.correlation_id) == (MessageType.RESPONSE, f"e{n}")
        assert payload_of(frames) == {"seq": n}
    out = published(broker)
    assert [(f, h.seq, body) for f, h, body in out] == [(b"orders.new.", 1, {"n": 1}), (b"orders.new.", 2, {"n": 2})]


def test_node_event_is_acknowledged_on_the_nodes_own_envelope(broker: Broker) -> None:
    """A node publishes with envelope b"" and gets its acknowledgement the same way."""
    side, ident, frames = only(broker.node_message(NODE_A, [b"", *event_frames("kv.changed", "k")], 1.0))
    assert (side, ident, frames[0]) == (Side.NODE, NODE_A, b"")
    assert payload_of(frames) == {"seq": 1}
    assert topics(broker) == ["kv.changed"]


def test_refused_event_is_answered_and_not_published(broker: Broker) -> None:
    """An event on a broker topic is answered ACCESS_DENIED, counted, and never fanned out."""
    _, _, frames = only(broker.client_message(CLIENT, event_frames("mesh.node.up", id="bad"), 1.0))
    h = header_of(frames)
    assert h.error is not None and h.error.code == ErrorCode.ACCESS_DENIED and h.correlation_id == "bad"
    assert published(broker) == []
    assert broker.counters["events_refused"] == 1


def test_replay_is_a_system_action(broker: Broker) -> None:
    """mesh.replay answers with the retained events after a position."""
    for n in range(3):
        broker.client_message(CLIENT, event_frames("t", n, id=f"e{n}"), 1.0)
    h, answer = system(broker, CLIENT, "replay", {"prefix": "t", "after": 1})
    assert h.type is MessageType.RESPONSE
    assert [header_of(e).seq for e in answer["events"]] == [2, 3]
    h, _ = system(broker, CLIENT, "replay", {"after": "x"})
    assert h.error is not None and h.error.code == ErrorCode.VALIDATION_FAILED


def test_ping_names_the_event_endpoint(broker: Broker) -> None:
    """Clients find where to subscribe from mesh.ping."""
    broker.events_endpoint = "tcp://127.0.0.1:5557"
    _, answer = system(broker, CLIENT, "ping")
    assert answer["events"] == "tcp://127.0.0.1:5557"


def test_sync_request_is_answered_with_a_marker(broker: Broker) -> None:
    """A subscriber's control filter gets a marker on exactly that filter."""
    broker.subscriber_message(b"\x01" + CONTROL + b"s1" * 16, 1.0)
    [(frame0, h, body)] = published(broker)
    assert frame0 == CONTROL + b"s1" * 16 and h.type is MessageType.EVENT and body["broker"] == "b1"


def test_node_up_and_service_registered(broker: Broker) -> None:
    """A new node announces itself and each of its services."""
    register(broker, NODE_A, {"kv": ["get"], "echo": ["say"]}, capacity=3, now=1.0)
    out = published(broker)
    assert [h.topic for _, h, _ in out] == ["mesh.node.up", "mesh.service.registered", "mesh.service.registered"]
    assert out[0][2] == {"node": "node-a", "id": NODE_A.hex(), "capacity": 3, "services": ["echo", "kv"]}
    assert [body["service"] for _, _, body in out[1:]] == ["echo", "kv"]
    assert all(body["nodes"] == 1 for _, _, body in out[1:])


def test_reregistration_reports_only_what_changed(broker: Broker) -> None:
    """Registering again is no new node; services gained and lost are reported."""
    register(broker, NODE_A, {"kv": ["get"], "echo": ["say"]}, now=1.0)
    published(broker)
    register(broker, NODE_A, {"kv": ["get"], "fs": ["read"]}, now=2.0)
    assert [(h.topic, body["service"]) for _, h, body in published(broker)] == [
        ("mesh.service.unregistered", "echo"),
        ("mesh.service.registered", "fs"),
    ]


@pytest.mark.parametrize("how", ["unregistered", "silent", "unreachable"])
def test_node_down_says_why(broker: Broker, how: str) -> None:
    """A node that leaves, falls silent or cannot be reached is announced down, after its services."""
    register(broker, NODE_A, {"kv": ["get"]}, now=1.0)
    register(broker, NODE_B, {"kv": ["get"]}, now=1.0)
    published(broker)
    if how == "unregistered":
        broker.node_message(NODE_A, node_system("unregister", {}), 2.0)
    elif how == "silent":
        broker.node_message(NODE_B, node_system("heartbeat", {}), 500.0)
        broker.tick(500.0)
    else:
        broker.undeliverable(Side.NODE, NODE_A, [b"x", b"y", b"z"], 2.0)
    out = published(broker)
    assert [h.topic for _, h, _ in out] == ["mesh.service.unregistered", "mesh.node.down"]
    assert out[0][2] == {"service": "kv", "node": "node-a", "id": NODE_A.hex(), "nodes": 1}
    assert out[1][2]["reason"] == how and out[1][2]["node"] == "node-a"


def test_failed_commands_are_announced_without_payloads(broker: Broker) -> None:
    """Broker-made and node-made failures both publish mesh.command.failed with ids and codes only."""
    broker.client_message(CLIENT, command_frames("nope", "x", id="c1", payload={"secret": "s3cr3t"}), 1.0)
    register(broker, NODE_A, {"kv": ["get"]}, now=1.0)
    published(broker)
    _, _, dispatch = only(broker.client_message(CLIENT, command_frames("kv", "get", id="c2", payload="s3cr3t"), 1.0))
    broker.node_message(NODE_A, error_reply(dispatch, InternalError("boom")), 2.0)
    broker.client_message(CLIENT, command_frames("kv", "get", id="c3", deadline=5.0), 3.0)
    broker.tick(6.0)
    broker2 = Broker()
    broker2.client_message(CLIENT, command_frames("nope", "x", id="c1", payload={"secret": "s3cr3t"}), 1.0)
    failures = [(body["id"], body["code"]) for _, h, body in published(broker) if h.topic == "mesh.command.failed"]
    assert failures == [("c2", int(ErrorCode.INTERNAL)), ("c3", int(ErrorCode.DEADLINE_EXCEEDED))]
    raw = b"".join(b"".join(f) for f in broker2.take_published())
    assert b"mesh.command.failed" in raw and b"s3cr3t" not in raw


def test_lifecycle_events_are_retained_for_replay(broker: Broker) -> None:
    """The broker's own events can be replayed like any other."""
    register(broker, NODE_A, {"kv": ["get"]}, now=1.0)
    _, answer = system(broker, CLIENT, "replay", {"prefix": "mesh.node"})
    assert [header_of(e).topic for e in answer["events"]] == ["mesh.node.up"]
