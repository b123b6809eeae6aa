"""Peers that vanish: sends the loop reports as undeliverable, to nodes and to clients."""

from __future__ import annotations

import pytest

from mesh.broker import Broker, Side
from mesh.protocol import ErrorCode
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    NODE_B,
    command_frames,
    dispatched_ids,
    error_of,
    header_of,
    node_system,
    only,
    register,
    reply,
    to_clients,
)

NODE_C = b"node-c"


@pytest.fixture
def broker() -> Broker:
    return Broker()


def test_unsent_dispatch_is_requeued_to_another_node(broker: Broker) -> None:
    """A dispatch that never reached its node goes to another node offering the action."""
    register(broker, NODE_A, {"echo": ["say"]})
    frames = command_frames("echo", "say", id="c1", payload="hi")
    side, first, d = only(broker.client_message(CLIENT, frames, 1.0))
    assert first == NODE_A
    register(broker, NODE_B, {"echo": ["say"]}, now=1.5)
    out = broker.undeliverable(Side.NODE, NODE_A, d, 2.0)
    side, ident, again = only(out)
    assert (side, ident) == (Side.NODE, NODE_B)
    assert again[0] == CLIENT
    assert again[1] is frames[0] and again[2] is frames[1]
    assert NODE_A not in broker.registry.nodes
    assert NODE_A not in broker.node_links
    assert broker.commands[(CLIENT, "c1")].state.value == "dispatched"
    assert broker.counters["undeliverable"] == 1
    # B's answer reaches the client.
    assert only(broker.node_message(NODE_B, reply(again), 3.0))[1] == CLIENT


def test_other_in_flight_commands_of_lost_node_get_node_lost(broker: Broker) -> None:
    """The vanished node's other dispatched commands are answered NODE_LOST (retryable)."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=3)
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0))
    only(broker.client_message(CLIENT_B, command_frames("echo", "say", id="c3"), 1.0))
    register(broker, NODE_B, {"echo": ["say"]}, capacity=3, now=1.5)
    out = broker.undeliverable(Side.NODE, NODE_A, d1, 2.0)
    assert dispatched_ids(out) == ["c1"]
    lost = {(ident, header_of(f).correlation_id): error_of(f) for _, ident, f in to_clients(out)}
    assert set(lost) == {(CLIENT, "c2"), (CLIENT_B, "c3")}
    assert all(e.code == ErrorCode.NODE_LOST and e.retryable for e in lost.values())
    assert broker.counters["failed"] == 2
    assert set(broker.commands) == {(CLIENT, "c1")}


def test_queued_commands_fail_node_lost_when_no_node_is_left(broker: Broker) -> None:
    """With no other node offering the action, its queued commands are answered NODE_LOST."""
    register(broker, NODE_A, {"echo": ["say"]})
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="q1"), 1.0) == []
    assert broker.client_message(CLIENT_B, command_frames("echo", "say", id="q2"), 1.0) == []
    out = broker.undeliverable(Side.NODE, NODE_A, d1, 2.0)
    assert all(s is Side.CLIENT for s, _, _ in out)
    answered = {(i, header_of(f).correlation_id): error_of(f).code for _, i, f in out}
    assert answered == {
        (CLIENT, "c1"): ErrorCode.NODE_LOST,
        (CLIENT, "q1"): ErrorCode.NODE_LOST,
        (CLIENT_B, "q2"): ErrorCode.NODE_LOST,
    }
    assert not broker.commands
    assert broker.queued == 0
    # The action is gone: a new command is HANDLER_NOT_FOUND.
    _, _, f = only(broker.client_message(CLIENT, command_frames("echo", "say"), 3.0))
    assert error_of(f).code == ErrorCode.HANDLER_NOT_FOUND


def test_queued_commands_wait_when_remaining_node_is_busy(broker: Broker) -> None:
    """If another node offers the action but is full, the requeued command waits for it."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"echo": ["say"]})
    _, n1, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    _, n2, d2 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0))
    assert {n1, n2} == {NODE_A, NODE_B}
    out = broker.undeliverable(Side.NODE, n1, d1, 2.0)
    assert out == []
    assert broker.queued == 1
    assert broker.queues[("echo", "say")][0].id == "c1"
    # When the survivor answers c2, it takes c1 next.
    out = broker.node_message(n2, reply(d2), 3.0)
    assert dispatched_ids(out) == ["c1"]


def test_requeued_command_goes_before_newer_queued_ones(broker: Broker) -> None:
    """A requeued command is put at the front of its queue."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"echo": ["say"]})
    _, n1, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    _, n2, d2 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0))
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c3"), 1.5) == []
    broker.undeliverable(Side.NODE, n1, d1, 2.0)
    assert [c.id for c in broker.queues[("echo", "say")]] == ["c1", "c3"]
    assert dispatched_ids(broker.node_message(n2, reply(d2), 3.0)) == ["c1"]


def test_lost_node_only_affects_its_own_actions(broker: Broker) -> None:
    """Losing a node leaves another node's actions and queued commands alone."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"kv": ["get"]})
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    only(broker.client_message(CLIENT, command_frames("kv", "get", id="k1"), 1.0))
    assert broker.client_message(CLIENT, command_frames("kv", "get", id="k2"), 1.0) == []
    out = broker.undeliverable(Side.NODE, NODE_A, d1, 2.0)
    assert [header_of(f).correlation_id for _, _, f in out] == ["c1"]
    assert broker.queued == 1
    assert broker.registry.offers("kv", "get")


def test_undeliverable_reply_to_unknown_node_is_harmless(broker: Broker) -> None:
    """An undeliverable send to a node the broker does not know changes nothing."""
    register(broker, NODE_A, {"echo": ["say"]})
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    assert broker.undeliverable(Side.NODE, NODE_C, [b"", b"junk", b"\xc0"], 2.0) == []
    assert broker.undeliverable(Side.NODE, NODE_C, [b"x"], 2.0) == []
    assert (CLIENT, "c1") in broker.commands
    assert broker.registry.offers("echo", "say")


def test_undeliverable_control_reply_to_node_fails_its_commands(broker: Broker) -> None:
    """A node unreachable for a control reply (envelope b"") is dropped; its commands are NODE_LOST."""
    register(broker, NODE_A, {"echo": ["say"]})
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    out = broker.undeliverable(Side.NODE, NODE_A, [b"", b"hdr", b"\xc0"], 2.0)
    _, ident, f = only(out)
    assert ident == CLIENT
    assert error_of(f).code == ErrorCode.NODE_LOST


def test_lost_client_commands_are_forgotten(broker: Broker) -> None:
    """`undeliverable(CLIENT)` forgets the client's queued and dispatched commands."""
    register(broker, NODE_A, {"echo": ["say"]})
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0) == []
    assert broker.client_message(CLIENT_B, command_frames("echo", "say", id="b1"), 1.0) == []
    assert broker.undeliverable(Side.CLIENT, CLIENT, [b"hdr", b"\xc0"], 2.0) == []
    assert CLIENT not in broker.clients or not broker.clients[CLIENT].is_connected
    assert set(broker.commands) == {(CLIENT_B, "b1")}
    assert [c.id for c in broker.queues[("echo", "say")]] == ["b1"]
    assert broker.queued == 1
    assert broker.counters["abandoned"] == 2
    # Nothing is ever sent for them; the node's answer to c1 is dropped and frees its slot
    # for the other client's queued command.
    out = broker.node_message(NODE_A, reply(d1), 3.0)
    assert to_clients(out) == []
    assert dispatched_ids(out) == ["b1"]
    assert broker.counters["late_replies"] == 1
    # And the forgotten commands never time out.
    assert all(i != CLIENT for _, i, _ in broker.tick(1000.0))


def test_lost_client_does_not_affect_other_clients(broker: Broker) -> None:
    """Forgetting one client leaves another client's dispatched command to be answered."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    d2 = only(broker.client_message(CLIENT_B, command_frames("echo", "say", id="c1"), 1.0))[2]
    broker.undeliverable(Side.CLIENT, CLIENT, [b"hdr", b"\xc0"], 2.0)
    assert only(broker.node_message(NODE_A, reply(d2), 3.0))[1] == CLIENT_B


def test_client_may_come_back_after_being_forgotten(broker: Broker) -> None:
    """A client identity forgotten after an undeliverable send is served again when it returns."""
    register(broker, NODE_A, {"echo": ["say"]})
    broker.undeliverable(Side.CLIENT, CLIENT, [b"hdr", b"\xc0"], 1.0)
    out = broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 2.0)
    assert dispatched_ids(out) == ["c1"]
    assert broker.clients[CLIENT].is_connected


def test_node_may_register_again_after_being_lost(broker: Broker) -> None:
    """A node dropped after an undeliverable send starts from zero load when it re-registers."""
    register(broker, NODE_A, {"echo": ["say"]})
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    broker.undeliverable(Side.NODE, NODE_A, d1, 2.0)
    register(broker, NODE_A, {"echo": ["say"]}, now=3.0)
    assert broker.registry.nodes[NODE_A].in_flight == 0
    out = broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 4.0)
    assert dispatched_ids(out) == ["c2"]


def test_lost_reregistered_node_fails_its_commands(broker: Broker) -> None:
    """Commands dispatched before a node re-registered are still answered when it is lost."""
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0))
    assert register(broker, NODE_A, {"echo": ["say"]}, capacity=2, now=1.5) == []
    assert broker.registry.nodes[NODE_A].in_flight == 2
    out = broker.undeliverable(Side.NODE, NODE_A, d1, 2.0)
    # c1 never reached the node and nobody else offers echo.say; c2 was running on it.
    answered = {(i, header_of(f).correlation_id): error_of(f).code for _, i, f in out}
    assert answered == {(CLIENT, "c1"): ErrorCode.NODE_LOST, (CLIENT, "c2"): ErrorCode.NODE_LOST}
    assert not broker.commands
    assert broker.queued == 0


def test_two_unsent_dispatches_in_one_batch(broker: Broker) -> None:
    """Every dispatch of a failed batch (`frames` and `more`) is requeued; what the node had received is NODE_LOST."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"echo": ["say"]}, capacity=3)
    _, n1, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    assert n1 == NODE_A
    _, n0, _ = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c0"), 1.0))
    assert n0 == NODE_B  # sent in an earlier batch: B received it
    # One batch holds two dispatches to B; the first send fails and the loop reports it
    # with the rest of that batch for B, which it did not try to send.
    _, n2, d2 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.5))
    _, n3, d3 = only(broker.client_message(CLIENT_B, command_frames("echo", "say", id="c3"), 1.5))
    assert n2 == n3 == NODE_B
    out = broker.undeliverable(Side.NODE, NODE_B, d2, 2.0, more=[d3])
    assert broker.counters["undeliverable"] == 2
    # c0 was running on B: NODE_LOST. c2 and c3 never reached it: requeued, and they wait
    # because A is full.
    assert dispatched_ids(out) == []
    lost = [(i, header_of(f).correlation_id, error_of(f).code) for _, i, f in to_clients(out)]
    assert lost == [(CLIENT, "c0", ErrorCode.NODE_LOST)]
    assert broker.queued == 2
    assert {(c.client, c.id) for c in broker.queues[("echo", "say")]} == {(CLIENT, "c2"), (CLIENT_B, "c3")}
    assert all(c.state.value == "queued" and c.node is None for c in broker.queues[("echo", "say")])
    assert set(broker.commands) == {(CLIENT, "c1"), (CLIENT, "c2"), (CLIENT_B, "c3")}
    # A runs them one after the other, and each answer reaches its client.
    out = broker.node_message(NODE_A, reply(d1), 3.0)
    assert [i for _, i, _ in to_clients(out)] == [CLIENT]
    (first,) = [f for s, _, f in out if s is Side.NODE]
    out = broker.node_message(NODE_A, reply(first), 4.0)
    (second,) = [f for s, _, f in out if s is Side.NODE]
    assert {header_of(f).id for f in (first, second)} == {"c2", "c3"}
    assert only(broker.node_message(NODE_A, reply(second), 5.0))[0] is Side.CLIENT
    assert not broker.commands


def test_queued_commands_fail_when_last_node_unregisters(broker: Broker) -> None:
    """When the only node offering an action unregisters, commands queued for it are answered NODE_LOST."""
    register(broker, NODE_A, {"echo": ["say"]})
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="q1"), 1.0) == []
    out = broker.node_message(NODE_A, node_system("unregister", {}), 2.0)
    assert [(s, i) for s, i, _ in out] == [(Side.NODE, NODE_A), (Side.CLIENT, CLIENT)]
    answered = {header_of(f).correlation_id: error_of(f).code for s, _, f in out if s is Side.CLIENT}
    assert answered == {"q1": ErrorCode.NODE_LOST}
    assert broker.queued == 0
    # The node still answers c1, which it had been given before it left.
    assert only(broker.node_message(NODE_A, reply(d1), 3.0))[:2] == (Side.CLIENT, CLIENT)
    assert not broker.commands


def test_queued_commands_fail_when_reregistration_drops_their_action(broker: Broker) -> None:
    """A node re-registering without an action answers the commands queued for it NODE_LOST."""
    register(broker, NODE_A, {"echo": ["say", "shout"]})
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    assert broker.client_message(CLIENT, command_frames("echo", "shout", id="q1"), 1.0) == []
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="q2"), 1.0) == []
    extra = register(broker, NODE_A, {"echo": ["say"]}, now=2.0)
    answered = [(i, header_of(f).correlation_id, error_of(f).code) for _, i, f in extra]
    assert answered == [(CLIENT, "q1", ErrorCode.NODE_LOST)]
    # echo.say is still offered: q2 keeps waiting for the node's slot.
    assert [c.id for c in broker.queues[("echo", "say")]] == ["q2"]
    assert broker.queued == 1


def test_unsent_dispatches_are_requeued_in_arrival_order(broker: Broker) -> None:
    """Commands of a failed batch go back to the front of the queue in the order they arrived."""
    register(broker, NODE_A, {"echo": ["say"]})
    register(broker, NODE_B, {"echo": ["say"]}, capacity=10)
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="a0"), 1.0))
    sent = [
        only(broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), 1.0 + i / 100))
        for i in range(10)
    ]
    assert {ident for _, ident, _ in sent} == {NODE_B}
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="q"), 2.0) == []
    frames = [f for _, _, f in sent]
    assert broker.undeliverable(Side.NODE, NODE_B, frames[0], 3.0, more=frames[1:]) == []
    assert [c.id for c in broker.queues[("echo", "say")]] == [*(f"c{i}" for i in range(10)), "q"]
