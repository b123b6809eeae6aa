"""Deadlines: refused when already past, expired by tick(), late replies after expiry."""

from __future__ import annotations

import pytest

from mesh.broker import Broker, BrokerConfig, Side
from mesh.protocol import ErrorCode
from mesh.testing.frames import (
    CLIENT,
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
)


@pytest.fixture
def broker() -> Broker:
    b = Broker(BrokerConfig(default_timeout=30.0))
    register(b, NODE_A, {"echo": ["say"]})
    return b


def test_past_deadline_is_refused(broker: Broker) -> None:
    """A command whose deadline has already passed is answered DEADLINE_EXCEEDED, not routed, and counts as timed out."""
    failed = broker.counters["failed"]
    side, ident, out = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=5.0), 10.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    err = error_of(out)
    assert err.code == ErrorCode.DEADLINE_EXCEEDED
    assert err.retryable is True
    assert header_of(out).correlation_id == "c1"
    assert not broker.commands
    assert broker.registry.nodes[NODE_A].in_flight == 0
    assert broker.counters["timed_out"] == 1
    assert broker.counters["failed"] == failed
    assert broker.counters[f"error_{int(ErrorCode.DEADLINE_EXCEEDED)}"] == 1


def test_deadline_equal_to_now_is_refused(broker: Broker) -> None:
    """A deadline exactly at `now` leaves no time and is refused."""
    _, _, out = only(broker.client_message(CLIENT, command_frames("echo", "say", deadline=10.0), 10.0))
    assert error_of(out).code == ErrorCode.DEADLINE_EXCEEDED


def test_deadline_is_checked_before_the_service(broker: Broker) -> None:
    """An expired command to an unknown service reports the deadline (the first problem)."""
    _, _, out = only(broker.client_message(CLIENT, command_frames("nope", "x", deadline=1.0), 10.0))
    assert error_of(out).code == ErrorCode.DEADLINE_EXCEEDED


def test_tick_before_deadline_does_nothing(broker: Broker) -> None:
    """tick() before any deadline sends nothing and keeps the command."""
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=5.0), 1.0))
    assert broker.tick(4.999) == []
    assert (CLIENT, "c1") in broker.commands


def test_tick_expires_dispatched_and_queued_commands(broker: Broker) -> None:
    """After the deadline, tick() answers both the dispatched and the queued command."""
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="d1", deadline=5.0), 1.0))
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="q1", deadline=5.0), 1.0) == []
    out = broker.tick(5.0)
    assert {(s, i) for s, i, _ in out} == {(Side.CLIENT, CLIENT)}
    by_id = {header_of(f).correlation_id: error_of(f) for _, _, f in out}
    assert set(by_id) == {"d1", "q1"}
    assert {e.code for e in by_id.values()} == {ErrorCode.DEADLINE_EXCEEDED}
    assert by_id["d1"].details == {"state": "dispatched"}
    assert by_id["q1"].details == {"state": "queued"}
    assert broker.queued == 0 and not broker.queues[("echo", "say")]
    assert not broker.commands
    assert broker.counters["timed_out"] == 2
    # A second tick has nothing left to expire.
    assert broker.tick(6.0) == []


def test_expired_dispatch_keeps_node_slot_until_node_answers(broker: Broker) -> None:
    """An expired dispatched command still occupies its node slot; new work queues."""
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="d1", deadline=5.0), 1.0))
    broker.tick(5.0)
    assert broker.registry.nodes[NODE_A].in_flight == 1
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c2", deadline=50.0), 6.0) == []
    assert broker.queued == 1


def test_late_reply_is_counted_not_forwarded_and_frees_the_slot(broker: Broker) -> None:
    """A reply after expiry is dropped, counted as late, and lets a queued command run."""
    completed = broker.counters["completed"]  # NODE_A's mesh.register
    _, _, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="d1", deadline=5.0), 1.0))
    broker.tick(5.0)
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c2", deadline=50.0), 6.0) == []
    out = broker.node_message(NODE_A, reply(d1, "too late"), 7.0)
    assert [(s, i) for s, i, _ in out] == [(Side.NODE, NODE_A)]
    assert dispatched_ids(out) == ["c2"]
    assert broker.counters["late_replies"] == 1
    assert broker.counters["unexpected_replies"] == 0
    assert broker.counters["completed"] == completed
    assert broker.counters["timed_out"] == 1
    assert broker.registry.nodes[NODE_A].in_flight == 1
    assert broker.node_links[NODE_A].pending_commands == {(CLIENT, "c2")}


def test_default_timeout_applies_without_deadline(broker: Broker) -> None:
    """A command without a deadline expires `default_timeout` seconds after it arrived."""
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 100.0))
    assert broker.commands[(CLIENT, "c1")].deadline == 130.0
    assert broker.tick(129.9) == []
    _, _, out = only(broker.tick(130.0))
    assert error_of(out).code == ErrorCode.DEADLINE_EXCEEDED


def test_configured_default_timeout_is_used() -> None:
    """`BrokerConfig.default_timeout` sets the deadline of commands that carry none."""
    broker = Broker(BrokerConfig(default_timeout=2.5))
    register(broker, NODE_A, {"echo": ["say"]})
    broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 10.0)
    assert broker.tick(12.4) == []
    assert len(broker.tick(12.5)) == 1


def test_queued_commands_expire_in_any_order(broker: Broker) -> None:
    """Only the expired one of several queued commands is answered and removed from the queue."""
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="d1", deadline=100.0), 1.0))
    broker.client_message(CLIENT, command_frames("echo", "say", id="q1", deadline=50.0), 1.0)
    broker.client_message(CLIENT, command_frames("echo", "say", id="q2", deadline=5.0), 1.0)
    broker.client_message(CLIENT, command_frames("echo", "say", id="q3", deadline=50.0), 1.0)
    out = broker.tick(6.0)
    assert [header_of(f).correlation_id for _, _, f in out] == ["q2"]
    assert [c.id for c in broker.queues[("echo", "say")]] == ["q1", "q3"]
    assert broker.queued == 2


def test_client_may_resend_after_expiry(broker: Broker) -> None:
    """After DEADLINE_EXCEEDED the same command id is a new command, not a duplicate."""
    register(broker, NODE_B, {"echo": ["say"]})
    _, node, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=5.0), 1.0))
    broker.tick(5.0)
    broker.node_message(node, reply(d1), 5.5)  # the node finishes the expired copy
    out = broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=50.0), 6.0)
    assert dispatched_ids(out) == ["c1"]
    assert broker.counters["duplicates"] == 0


def test_resend_while_the_node_still_runs_it_rejoins_the_running_copy(broker: Broker) -> None:
    """A resend of an expired command that its node still runs is not run again; that copy's answer serves it."""
    register(broker, NODE_B, {"echo": ["say"]}, capacity=1)
    _, node, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=5.0), 1.0))
    broker.tick(5.0)
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=50.0), 6.0) == []
    assert broker.counters["rejoined"] == 1
    assert broker.registry.nodes[node].in_flight == 1
    side, ident, frames = only(broker.node_message(node, reply(d1), 7.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert header_of(frames).correlation_id == "c1"
    assert not broker.commands and broker.registry.nodes[node].in_flight == 0


def test_late_reply_frees_slot_even_if_id_was_resent_elsewhere(broker: Broker) -> None:
    """A draining node's late reply frees its slot even after the client's resend went to another node."""
    register(broker, NODE_B, {"echo": ["say"]})
    side, first, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=5.0), 1.0))
    broker.tick(5.0)
    broker.node_message(first, node_system("unregister", {}, now=5.5), 5.5)  # it drains: no new work
    _, second, d2 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=50.0), 6.0))
    assert first != second
    assert broker.node_message(first, reply(d1), 7.0) == []  # late: not forwarded
    assert broker.counters["late_replies"] == 1
    assert broker.node_links[first].pending_commands == set()
    # The resent command still waits for, and gets, the other node's reply.
    assert broker.registry.nodes[second].in_flight == 1
    assert only(broker.node_message(second, reply(d2), 8.0))[:2] == (Side.CLIENT, CLIENT)
    assert not broker.commands


def test_duplicate_reply_does_not_free_a_busy_slot(broker: Broker) -> None:
    """A node answering the same command twice cannot make room beyond its capacity."""
    _, _, d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    assert only(broker.node_message(NODE_A, reply(d1), 2.0))[1] == CLIENT
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 3.0))
    assert broker.registry.nodes[NODE_A].in_flight == 1
    # The node's reply to c1 arrives a second time (e.g. resent after a reconnect).
    assert broker.node_message(NODE_A, reply(d1), 4.0) == []
    assert broker.counters["unexpected_replies"] == 1
    assert broker.counters["late_replies"] == 0
    assert broker.registry.nodes[NODE_A].in_flight == 1
    # c3 must wait: the node (capacity 1) is still running c2.
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c3"), 5.0) == []


def test_a_resend_never_runs_twice_on_one_node_so_capacity_holds() -> None:
    """A resend of a command its node still runs adds no second copy: the node's capacity stays exact."""
    broker = Broker()
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=5.0), 1.0))
    broker.tick(5.0)
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=50.0), 6.0) == []
    assert broker.registry.nodes[NODE_A].in_flight == 1
    assert dispatched_ids(broker.client_message(CLIENT, command_frames("echo", "say", id="c2", deadline=50.0), 6.0)) == ["c2"]
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c3", deadline=50.0), 6.0) == []
    assert broker.registry.nodes[NODE_A].in_flight == 2