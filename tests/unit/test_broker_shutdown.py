"""Draining: after begin_drain() new commands are refused and accepted ones still finish."""

from __future__ import annotations

import pytest

from mesh.broker import Broker, Side
from mesh.protocol import ErrorCode, MessageType
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    command_frames,
    dispatched_ids,
    error_of,
    header_of,
    only,
    register,
    reply,
    system,
)


@pytest.fixture
def broker() -> Broker:
    b = Broker()
    register(b, NODE_A, {"echo": ["say"]})
    return b


def test_not_drained_before_begin_drain(broker: Broker) -> None:
    """An idle broker is not `drained` until asked to drain."""
    assert broker.drained is False
    broker.begin_drain()
    assert broker.drained is True


def test_new_commands_are_refused_unavailable(broker: Broker) -> None:
    """After begin_drain() a new command is answered UNAVAILABLE (retryable elsewhere)."""
    broker.begin_drain()
    side, ident, out = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    err = error_of(out)
    assert err.code == ErrorCode.UNAVAILABLE
    assert err.retryable is True
    assert header_of(out).correlation_id == "c1"
    assert not broker.commands
    assert broker.registry.nodes[NODE_A].in_flight == 0


def test_in_flight_and_queued_commands_still_complete(broker: Broker) -> None:
    """Dispatched and queued commands accepted before the drain are still answered by nodes."""
    completed = broker.counters["completed"]  # NODE_A's mesh.register
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    assert broker.client_message(CLIENT_B, command_frames("echo", "say", id="c2"), 1.0) == []
    broker.begin_drain()
    assert broker.drained is False
    out = broker.node_message(NODE_A, reply(d1), 2.0)
    assert out[0][1] == CLIENT and header_of(out[0][2]).type is MessageType.RESPONSE
    assert dispatched_ids(out) == ["c2"]
    assert broker.drained is False
    d2 = out[1][2]
    out = broker.node_message(NODE_A, reply(d2), 3.0)
    assert only(out)[1] == CLIENT_B
    assert broker.drained is True
    assert broker.counters["completed"] == completed + 2


def test_drained_when_remaining_commands_time_out(broker: Broker) -> None:
    """Commands that expire during the drain also count as done."""
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", deadline=5.0), 1.0))
    broker.begin_drain()
    assert broker.drained is False
    only(broker.tick(5.0))
    assert broker.drained is True


def test_resend_of_accepted_command_during_drain_is_a_duplicate(broker: Broker) -> None:
    """A resend of a command accepted before the drain is not refused: the first copy answers."""
    only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    broker.begin_drain()
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 2.0) == []
    assert broker.counters["duplicates"] == 1


def test_system_service_still_answers_during_drain(broker: Broker) -> None:
    """`mesh.ping` still answers while draining, so callers can see the broker is alive."""
    broker.begin_drain()
    h, p = system(broker, CLIENT, "ping", now=3.0)
    assert h.type is MessageType.RESPONSE and p["pong"] is True


def test_refusals_during_drain_are_counted_failed(broker: Broker) -> None:
    """Each refused command counts as failed with error code 3006."""
    broker.begin_drain()
    for i in range(3):
        broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), 1.0)
    assert broker.counters["failed"] == 3
    assert broker.counters["error_3006"] == 3
