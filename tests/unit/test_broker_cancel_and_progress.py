"""How the broker core carries a client's `cancel` and a node's `progress` (sans-IO)."""

from __future__ import annotations

import pytest

from mesh.broker import Broker, BrokerConfig, Side
from mesh.protocol import (
    ErrorCode,
    MessageType,
    encode_cancel_header,
    encode_payload,
    encode_progress_header,
)
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    command_frames,
    error_of,
    header_of,
    only,
    payload_of,
    register,
    reply,
    system,
    to_clients,
    to_nodes,
)


@pytest.fixture
def broker() -> Broker:
    return Broker(BrokerConfig(name="b1"))


def cancel(cid: str) -> list[bytes]:
    return [encode_cancel_header(cid, now=1.0), b"\xc0"]


def test_cancel_of_a_dispatched_command_answers_cancelled_and_tells_the_node(broker: Broker) -> None:
    """The client gets CANCELLED at once; the node gets the cancel with the client's envelope."""
    register(broker, NODE_A, {"slow": ["wait"]})
    broker.client_message(CLIENT, command_frames("slow", "wait", id="c1"), 1.0)
    out = broker.client_message(CLIENT, cancel("c1"), 1.1)
    (_, node, to_node), = to_nodes(out)
    (_, client, to_client), = to_clients(out)
    assert node == NODE_A and to_node[0] == CLIENT
    assert header_of(to_node).type is MessageType.CANCEL and header_of(to_node).correlation_id == "c1"
    assert client == CLIENT and error_of(to_client).code == ErrorCode.CANCELLED
    assert header_of(to_client).correlation_id == "c1"
    assert "c1" not in {cid for _, cid in broker.commands}


def test_the_node_slot_frees_only_when_the_node_answers(broker: Broker) -> None:
    """After a cancel the node still owes a reply; it frees the slot and is not passed on."""
    register(broker, NODE_A, {"slow": ["wait"]}, capacity=1)
    _, _, dispatch = only(broker.client_message(CLIENT, command_frames("slow", "wait", id="c1"), 1.0))
    broker.client_message(CLIENT, cancel("c1"), 1.1)
    queued = broker.client_message(CLIENT, command_frames("slow", "wait", id="c2"), 1.2)
    assert queued == [] and broker.queued == 1
    out = broker.node_message(NODE_A, reply(dispatch, "late"), 1.3)
    assert to_clients(out) == [] and header_of(only(to_nodes(out))[2]).id == "c2"


def test_cancel_of_a_queued_command_takes_it_out_of_the_queue(broker: Broker) -> None:
    """A queued command is answered CANCELLED and never reaches a node."""
    register(broker, NODE_A, {"slow": ["wait"]}, capacity=1)
    broker.client_message(CLIENT, command_frames("slow", "wait", id="c1"), 1.0)
    broker.client_message(CLIENT, command_frames("slow", "wait", id="c2"), 1.0)
    side, _, frames = only(broker.client_message(CLIENT, cancel("c2"), 1.1))
    assert side is Side.CLIENT and error_of(frames).details["state"] == "queued"
    assert broker.queued == 0


def test_cancel_of_an_unknown_or_someone_elses_command_is_ignored(broker: Broker) -> None:
    """Nothing answers a cancel of a command the broker does not hold for that client."""
    register(broker, NODE_A, {"slow": ["wait"]})
    broker.client_message(CLIENT, command_frames("slow", "wait", id="c1"), 1.0)
    assert broker.client_message(CLIENT_B, cancel("c1"), 1.1) == []
    assert broker.client_message(CLIENT, cancel("nope"), 1.1) == []
    assert broker.counters["cancels_ignored"] == 2


def test_progress_from_the_running_node_reaches_the_client_untouched(broker: Broker) -> None:
    """A progress message for a command the node runs goes to its client, same bytes."""
    register(broker, NODE_A, {"slow": ["wait"]})
    _, _, dispatch = only(broker.client_message(CLIENT, command_frames("slow", "wait", id="c1"), 1.0))
    frames = [CLIENT, encode_progress_header("c1", now=1.1), encode_payload({"progress": 1, "total": 2})]
    side, ident, out = only(broker.node_message(NODE_A, frames, 1.1))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert out[0] is frames[1] and out[1] is frames[2]
    assert payload_of(out) == {"progress": 1, "total": 2}


def test_progress_for_a_command_the_node_does_not_run_is_dropped(broker: Broker) -> None:
    """A stray progress (finished, cancelled, never sent) is counted and dropped."""
    register(broker, NODE_A, {"slow": ["wait"]})
    frames = [CLIENT, encode_progress_header("c9", now=1.1), encode_payload({"progress": 1})]
    assert broker.node_message(NODE_A, frames, 1.1) == []
    assert broker.counters["stray_progress"] == 1


def test_services_with_callable_is_the_whole_registry_without_security(broker: Broker) -> None:
    """Without security every caller may call everything, so {callable: true} changes nothing."""
    register(broker, NODE_A, {"slow": ["wait"], "kv": ["get"]})
    _, everything = system(broker, CLIENT, "services")
    _, callable_ = system(broker, CLIENT, "services", {"callable": True})
    assert callable_ == everything and set(everything) == {"kv", "slow"}
