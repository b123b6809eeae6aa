"""The node's sans-IO protocol with each broker (`mesh.node.core.BrokerPeer`), driven with a fake clock.

The loop only sends what these return and applies the `ControlAnswer`s; here the
decisions themselves are checked without a socket.
"""

from __future__ import annotations

from typing import Any

from mesh.link.health import PeerState
from mesh.node import Node
from mesh.node.core import BrokerPeer, load_report, mean_latency
from mesh.protocol import (
    InternalError,
    decode_header,
    encode_header,
    encode_payload,
    encode_response_header,
    error_header,
    unpack_header,
)


def answer_to(frames: list[bytes], payload: Any = None) -> tuple[Any, bytes]:
    """The broker's answer (header, payload frame) to the control command `frames`."""
    header = encode_response_header(unpack_header(frames[1]), 2.0)
    return decode_header(header), encode_payload(payload)


def refusal_of(frames: list[bytes]) -> tuple[Any, bytes]:
    """The broker's error answer to the control command `frames`."""
    cid = unpack_header(frames[1])["id"]
    return decode_header(encode_header(error_header(InternalError("no"), now=2.0, correlation_id=cid))), b"\xc0"


def test_one_registration_at_a_time() -> None:
    """While a registration is awaited no second one leaves; a refusal allows the next."""
    peer = BrokerPeer("tcp://b", 0.0)
    first = peer.register({"name": "n"}, 1.0)
    assert first is not None and unpack_header(first[1])["action"] == "register"
    assert peer.register({"name": "n"}, 1.0) is None
    answer = peer.answer(*refusal_of(first))
    assert (answer.action, answer.refused, peer.registered) == ("register", True, False)
    assert peer.register({"name": "n"}, 1.5) is not None


def test_registration_answer_carries_the_brokers_limit() -> None:
    """An accepted registration marks the broker registered and reports a positive limit only."""
    peer = BrokerPeer("tcp://b", 0.0)
    frames = peer.register({}, 1.0)
    assert frames is not None
    answer = peer.answer(*answer_to(frames, {"max_message_bytes": 4096}))
    assert (answer.action, answer.limit, peer.registered, peer.registering) == ("register", 4096, True, False)
    other = BrokerPeer("tcp://c", 0.0)
    frames = other.register({}, 1.0)
    assert frames is not None
    assert other.answer(*answer_to(frames, {"max_message_bytes": 0})).limit is None
    assert other.registered


def test_only_the_newest_heartbeat_is_awaited() -> None:
    """A heartbeat sent before the newest is no longer matched: its late answer is not a heartbeat's."""
    peer = BrokerPeer("tcp://b", 0.0)
    old = peer.heartbeat({"in_flight": 0}, 1.0)
    new = peer.heartbeat({"in_flight": 0}, 2.0)
    assert peer.answer(*answer_to(old, {"known": True})).action is None
    assert peer.answer(*answer_to(new, {"known": True})).action == "heartbeat"
    assert peer.beat is None


def test_a_forgetful_broker_is_registered_again_once() -> None:
    """`known: false` means register again, unless a registration is already on its way."""
    peer = BrokerPeer("tcp://b", 0.0)
    reg = peer.register({}, 0.5)
    assert reg is not None
    peer.answer(*answer_to(reg, {}))
    answer = peer.answer(*answer_to(peer.heartbeat({}, 1.0), {"known": False}))
    assert answer.forgotten and not peer.registered
    assert peer.register({}, 1.1) is not None  # now registering
    assert not peer.answer(*answer_to(peer.heartbeat({}, 2.0), {"known": False})).forgotten


def test_broker_liveness_follows_the_heartbeat_rule() -> None:
    """Silent past 1.5 intervals: suspect; past 3: dead; any message: up again."""
    peer = BrokerPeer("tcp://b", 0.0)
    peer.watch(1.4, 1.0)
    assert peer.state is PeerState.UP
    peer.watch(1.6, 1.0)
    assert peer.state is PeerState.SUSPECT
    peer.watch(3.1, 1.0)
    assert peer.state is PeerState.DEAD
    peer.heard(3.2)
    assert (peer.state, peer.heard_at) == (PeerState.UP, 3.2)


def test_load_report_and_mean_latency() -> None:
    """The heartbeat's load names in-flight, capacity and queued work; the mean moves a fifth of the way."""
    assert load_report([], 2, 8, None) == {"in_flight": 2, "capacity": 8, "queued": 0}
    assert load_report([], 0, 1, 1.23456)["latency_ms"] == 1.235
    assert mean_latency(None, 10.0) == 10.0
    assert mean_latency(10.0, 20.0) == 12.0


def test_registration_payload_is_the_nodes_declarations() -> None:
    """`Node.registration` lists each declared action with its flags, sorted by service and action."""
    node = Node("n", capacity=3)

    @node.action("svc", read_only=True)
    def b(payload: Any) -> Any:
        """B."""
        return payload

    @node.action("svc", idempotent=True)
    def a(payload: Any) -> Any:
        return payload

    reg = node.registration()
    assert (reg["name"], reg["instance"], reg["capacity"]) == ("n", node.instance, 3)
    actions = reg["services"]["svc"]["actions"]
    assert list(actions) == ["a", "b"]
    assert actions["b"] == {"description": "B.", "schema": {}, "idempotent": False, "exactly_once": False,
                            "read_only": True, "destructive": False}
    assert actions["a"]["idempotent"] is True
