"""Nodes that fall silent are declared dead by tick(); what they ran is settled, never left hanging."""

from __future__ import annotations

from mesh.broker import Broker, Side
from mesh.protocol import ErrorCode
from mesh.testing.frames import (
    CLIENT,
    NODE_A,
    NODE_B,
    command_frames,
    dispatched_ids,
    error_of,
    node_system,
    only,
    registration,
    reply,
    to_clients,
)


def join(broker: Broker, ident: bytes, *, idempotent: bool, interval: float = 1.0, capacity: int = 2) -> None:
    spec = {"description": "", "schema": {}, "idempotent": idempotent}
    payload = registration({"svc": {"act": spec}}, capacity=capacity, name=ident.decode(), heartbeat_interval=interval)
    broker.node_message(ident, node_system("register", payload, now=0.0), 0.0)


def test_a_node_silent_for_three_intervals_is_dead_and_its_commands_are_node_lost():
    """With a 1 s heartbeat, silence past 3 s removes the node; its non-idempotent commands get NODE_LOST."""
    broker = Broker()
    join(broker, NODE_A, idempotent=False)
    only(broker.client_message(CLIENT, command_frames("svc", "act", id="c1", deadline=100.0), 0.5))
    assert broker.tick(2.9) == []
    assert NODE_A in broker.registry.nodes
    side, ident, frames = only(broker.tick(3.1))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert error_of(frames).code == ErrorCode.NODE_LOST
    assert NODE_A not in broker.registry.nodes
    assert broker.counters["nodes_expired"] == 1 and not broker.commands


def test_any_message_from_the_node_keeps_it_alive():
    """Heartbeats and replies both count as signs of life."""
    broker = Broker()
    join(broker, NODE_A, idempotent=False)
    broker.node_message(NODE_A, node_system("heartbeat", {}, now=2.5), 2.5)
    _, _, d1 = only(broker.client_message(CLIENT, command_frames("svc", "act", id="c1", deadline=100.0), 4.0))
    broker.node_message(NODE_A, reply(d1), 5.0)
    assert broker.tick(7.9) == []
    assert NODE_A in broker.registry.nodes
    broker.tick(8.1)
    assert NODE_A not in broker.registry.nodes


def test_idempotent_commands_of_a_dead_node_run_again_on_another():
    """When a node dies, its idempotent commands are dispatched to another node instead of failing."""
    broker = Broker()
    join(broker, NODE_A, idempotent=True)
    only(broker.client_message(CLIENT, command_frames("svc", "act", id="c1", deadline=100.0), 0.5))
    join(broker, NODE_B, idempotent=True, interval=60.0)
    out = broker.tick(3.5)
    assert to_clients(out) == []
    assert dispatched_ids(out) == ["c1"]
    assert out[0][1] == NODE_B
    assert broker.counters["redispatched"] == 1


def test_a_dead_nodes_idempotent_command_waits_in_the_queue_when_no_one_has_room():
    """With the other node full, the re-routed command queues and runs when a slot frees."""
    broker = Broker()
    join(broker, NODE_A, idempotent=True)
    join(broker, NODE_B, idempotent=True, interval=60.0, capacity=1)
    first = [only(broker.client_message(CLIENT, command_frames("svc", "act", id=f"c{i}", deadline=100.0), 0.5)) for i in range(2)]
    assert {ident for _, ident, _ in first} == {NODE_A, NODE_B}
    assert broker.tick(3.5) == []
    assert broker.queued == 1
    on_b = next(frames for _, ident, frames in first if ident == NODE_B)
    out = broker.node_message(NODE_B, reply(on_b), 4.0)
    assert len(to_clients(out)) == 1 and len(dispatched_ids(out)) == 1
