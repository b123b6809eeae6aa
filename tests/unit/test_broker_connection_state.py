"""The seed's ProtocolState, kept per client and per node connection by the broker core."""

from __future__ import annotations

import pytest

from mesh.broker import Broker, ConnectionState, Side
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    command_frames,
    header_of,
    node_system,
    only,
    register,
    reply,
)


@pytest.fixture
def broker() -> Broker:
    b = Broker()
    register(b, NODE_A, {"echo": ["say"]}, now=0.5)
    return b


def test_first_client_message_creates_connection_state(broker: Broker) -> None:
    """A client's first message creates its state: connected, one message, its id and time."""
    assert CLIENT not in broker.clients
    broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 3.0)
    conn = broker.clients[CLIENT]
    assert isinstance(conn, ConnectionState)
    assert conn.is_connected is True
    assert conn.message_count == 1
    assert conn.last_message_id == "c1"
    assert conn.last_activity == 3.0
    assert conn.pending_commands == {"c1"}


def test_client_state_counts_every_message(broker: Broker) -> None:
    """message_count and last_activity move with every message, malformed ones included."""
    broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0)
    broker.client_message(CLIENT, [b"junk"], 2.0)
    broker.client_message(CLIENT, command_frames("mesh", "ping", id="p1"), 3.0)
    conn = broker.clients[CLIENT]
    assert conn.message_count == 3
    assert conn.last_activity == 3.0
    assert conn.last_message_id == "p1"


def test_malformed_message_keeps_last_message_id(broker: Broker) -> None:
    """A message whose header cannot be read leaves last_message_id at the last good id."""
    broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0)
    broker.client_message(CLIENT, [b"\xc1", b""], 2.0)
    assert broker.clients[CLIENT].last_message_id == "c1"
    assert broker.clients[CLIENT].last_activity == 2.0


def test_pending_commands_follow_the_command_lifecycle(broker: Broker) -> None:
    """pending_commands holds queued and dispatched ids until each is answered or expires."""
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    broker.client_message(CLIENT, command_frames("echo", "say", id="c2", deadline=5.0), 1.0)
    broker.client_message(CLIENT, command_frames("echo", "say", id="c3"), 1.0)
    assert broker.clients[CLIENT].pending_commands == {"c1", "c2", "c3"}
    broker.tick(5.0)
    assert broker.clients[CLIENT].pending_commands == {"c1", "c3"}
    broker.node_message(NODE_A, reply(d1), 6.0)  # answers c1, dispatches c3
    assert broker.clients[CLIENT].pending_commands == {"c3"}


def test_refused_commands_are_never_pending(broker: Broker) -> None:
    """Commands the broker refuses at once never appear in pending_commands."""
    broker.client_message(CLIENT, command_frames("nope", "x", id="c1"), 1.0)
    broker.client_message(CLIENT, command_frames("echo", "say", id="c2", deadline=0.5), 1.0)
    broker.client_message(CLIENT, command_frames("mesh", "ping", id="c3"), 1.0)
    assert broker.clients[CLIENT].pending_commands == set()


def test_client_states_are_separate(broker: Broker) -> None:
    """Each client identity has its own state."""
    broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0)
    broker.client_message(CLIENT_B, command_frames("echo", "say", id="b1"), 2.0)
    broker.client_message(CLIENT_B, command_frames("echo", "say", id="b2"), 2.5)
    assert broker.clients[CLIENT].message_count == 1
    assert broker.clients[CLIENT_B].message_count == 2
    assert broker.clients[CLIENT].pending_commands == {"c1"}
    assert broker.clients[CLIENT_B].pending_commands == {"b1", "b2"}


def test_lost_client_state_is_dropped(broker: Broker) -> None:
    """After an undeliverable send, the client is no longer listed as connected."""
    broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0)
    broker.undeliverable(Side.CLIENT, CLIENT, [b"h", b"p"], 2.0)
    conn = broker.clients.get(CLIENT)
    assert conn is None or (conn.is_connected is False and not conn.pending_commands)


def test_node_connection_state(broker: Broker) -> None:
    """A node's link state counts its messages and remembers its last message id and time."""
    link = broker.node_links[NODE_A]
    assert (link.is_connected, link.message_count, link.last_activity) == (True, 1, 0.5)
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    r = reply(d1)
    broker.node_message(NODE_A, r, 2.0)
    broker.node_message(NODE_A, node_system("heartbeat", {}, id="hb1"), 3.0)
    assert link.message_count == 3
    assert link.last_message_id == "hb1"
    assert link.last_activity == 3.0
    broker.node_message(NODE_A, r, 4.0)
    assert link.last_message_id == header_of(r).id
    assert broker.registry.nodes[NODE_A].last_seen == 4.0


def test_client_and_node_states_are_kept_apart(broker: Broker) -> None:
    """The same identity bytes on the client and node sides have separate states."""
    broker.client_message(NODE_A, command_frames("mesh", "ping"), 1.0)
    assert broker.clients[NODE_A].message_count == 1
    assert broker.node_links[NODE_A].message_count == 1


def test_lost_node_state_is_dropped(broker: Broker) -> None:
    """After an undeliverable send to a node, its link state and registration are gone."""
    broker.undeliverable(Side.NODE, NODE_A, [b"", b"h", b"p"], 2.0)
    assert NODE_A not in broker.node_links
    assert NODE_A not in broker.registry.nodes


def test_node_pending_commands_list_its_dispatched_commands(broker: Broker) -> None:
    """A node link's pending_commands holds the (client, id) keys it owes replies for until it answers them."""
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    link = broker.node_links[NODE_A]
    assert link.pending_commands == {(CLIENT, "c1")}
    broker.node_message(NODE_A, reply(d1), 2.0)
    assert link.pending_commands == set()


def test_node_capacity_is_counted_against_its_link_pending_commands() -> None:
    """NodeInfo.owed is the link's pending_commands set, and in_flight is its (read-only) size."""
    broker = Broker()
    register(broker, NODE_A, {"echo": ["say"]}, capacity=3)
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    only(broker.client_message(CLIENT_B, command_frames("echo", "say", id="c1"), 1.0))
    node = broker.registry.nodes[NODE_A]
    link = broker.node_links[NODE_A]
    assert node.owed is link.pending_commands
    assert link.pending_commands == {(CLIENT, "c1"), (CLIENT_B, "c1")}
    assert node.in_flight == 2
    with pytest.raises(AttributeError):
        node.in_flight = 0  # type: ignore[misc]
    # The set outlives the registration: unregistering and registering again keeps it.
    broker.node_message(NODE_A, node_system("unregister", {}), 2.0)
    assert link.pending_commands == {(CLIENT, "c1"), (CLIENT_B, "c1")}
    register(broker, NODE_A, {"echo": ["say"]}, capacity=3, now=3.0)
    again = broker.registry.nodes[NODE_A]
    assert again is not node
    assert again.owed is link.pending_commands
    assert again.in_flight == 2


def test_idle_clients_are_forgotten_by_tick(broker: Broker) -> None:
    """tick() drops clients silent for over 300 s with nothing pending, sweeping at most every 10 s."""
    broker.client_message(CLIENT, command_frames("mesh", "ping", id="p1"), 1.0)
    d1 = only(broker.client_message(CLIENT_B, command_frames("echo", "say", id="b1", deadline=1000.0), 1.0))[2]
    for t in (150.0, 300.0):  # the node stays alive meanwhile
        broker.node_message(NODE_A, node_system("heartbeat", {}, now=t), t)
    assert broker.tick(301.0) == []  # a sweep: CLIENT silent for exactly 300 s stays
    assert set(broker.clients) == {CLIENT, CLIENT_B}
    assert broker.tick(305.0) == []  # silent 304 s, but the last sweep was under 10 s ago
    assert CLIENT in broker.clients
    assert broker.tick(311.0) == []
    assert set(broker.clients) == {CLIENT_B}  # CLIENT_B is as quiet, but b1 is pending
    # Once b1 is answered CLIENT_B has nothing pending, and the next sweep drops it too.
    assert only(broker.node_message(NODE_A, reply(d1), 312.0))[:2] == (Side.CLIENT, CLIENT_B)
    broker.tick(320.0)
    assert set(broker.clients) == {CLIENT_B}
    broker.tick(321.0)
    assert broker.clients == {}
    # A forgotten client that comes back starts a fresh state.
    broker.client_message(CLIENT, command_frames("mesh", "ping", id="p2"), 400.0)
    assert broker.clients[CLIENT].message_count == 1
