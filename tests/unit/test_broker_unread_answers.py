"""Large mesh.* answers wait for the peer to acknowledge the ones before (no sockets)."""

from __future__ import annotations

from mesh.broker import Broker
from mesh.broker.core.system import MAX_UNREAD_ANSWERS
from mesh.protocol import ErrorCode
from mesh.testing.frames import CLIENT, CLIENT_B, event_frames, system


def full_history() -> Broker:
    """A broker whose history makes every replay page a large answer."""
    broker = Broker()
    for i in range(40):
        broker.client_message(CLIENT_B, event_frames(f"t.{i % 4}", {"blob": "x" * 4000}, id=f"e{i}"), 0.0)
    return broker


def test_a_peer_that_does_not_acknowledge_gets_at_most_a_few_large_answers() -> None:
    """Invariant: at most MAX_UNREAD_ANSWERS large answers wait unacknowledged per
    connection; the next is refused RESOURCE_EXHAUSTED, and small answers never count."""
    broker = full_history()
    for _ in range(MAX_UNREAD_ANSWERS):
        header, page = system(broker, CLIENT, "replay", {"prefix": "t"})
        assert isinstance(page["ack"], str) and len(page["events"]) == 40
    header, answer = system(broker, CLIENT, "replay", {"prefix": "t"})
    assert header.error is not None and header.error.code == ErrorCode.RESOURCE_EXHAUSTED
    assert header.error.details["reason"] == "unread answers"
    assert "ack" not in system(broker, CLIENT, "ping")[1]  # small: answered, not counted
    assert broker.counters["unread_answers_refused"] == 1


def test_showing_an_ack_releases_it_and_every_earlier_one() -> None:
    """A later request holding the last nonce acknowledges all before it; `ack` is taken
    out of the request before the action reads it (so replay's strict keys accept it)."""
    broker = full_history()
    acks = [system(broker, CLIENT, "replay", {"prefix": "t"})[1]["ack"] for _ in range(MAX_UNREAD_ANSWERS)]
    header, page = system(broker, CLIENT, "replay", {"prefix": "t", "ack": acks[-1]})
    assert header.error is None and page["ack"] not in acks
    assert len(broker.clients[CLIENT].unread) == 1
    header, _ = system(broker, CLIENT, "replay", {"prefix": "t", "ack": "forged"})
    assert header.error is None and len(broker.clients[CLIENT].unread) == 2
