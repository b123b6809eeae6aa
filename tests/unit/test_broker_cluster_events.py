"""Events in a broker cluster (sans-IO): committed through the log, numbered alike on
every broker, acknowledged to their publisher once committed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mesh.broker import Broker, BrokerConfig, Side
from mesh.cluster.messages import MAX_PROPOSAL_BYTES
from mesh.cluster.shared import SharedState, event_record
from mesh.protocol import ErrorCode, MessageType
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    error_of,
    event_frames,
    header_of,
    only,
    payload_of,
    published,
)
from mesh.testing.sharedlog import Cluster


def user_events(broker: Broker) -> list[tuple[str, int, Any]]:
    """(topic, seq, body) of what `broker` published since last asked, its own mesh.* events left out."""
    return [(h.topic, h.seq, body) for _, h, body in published(broker) if not h.topic.startswith("mesh.")]


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_an_event_is_published_on_every_broker_when_committed_and_then_acknowledged(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    assert b1.client_message(CLIENT, event_frames("orders.new", {"n": 1}, id="e1"), 1.0) == []
    assert b2.client_message(CLIENT_B, event_frames("orders.new", {"n": 2}, id="e2"), 1.0) == []
    assert user_events(b1) == [] and user_events(b2) == []  # nothing before the commit
    acks = cluster.commit(1.0)
    for broker in cluster.brokers:  # the same numbers on both brokers, in log order
        assert user_events(broker) == [("orders.new", 1, {"n": 1}), ("orders.new", 2, {"n": 2})]
    (side, ident, frames), = acks[0]
    assert (side, ident, header_of(frames).type, payload_of(frames)) == (Side.CLIENT, CLIENT, MessageType.RESPONSE, {"seq": 1})
    assert only(acks[1])[1] == CLIENT_B and payload_of(only(acks[1])[2]) == {"seq": 2}
    # A subscriber can move to the other broker and replay from where it was.
    replay = b2.events.replay({"prefix": "orders", "after": 1}, 1 << 20)
    assert [msgpack.unpackb(h)["seq"] for h, _ in replay["events"]] == [2]


def test_a_node_event_is_acknowledged_on_the_nodes_envelope(cluster: Cluster) -> None:
    b1, _ = cluster.brokers
    b1.node_message(NODE_A, [b"", *event_frames("kv.changed", "k")], 1.0)
    side, ident, frames = only(cluster.commit(1.0)[0])
    assert (side, ident, frames[0], payload_of(frames)) == (Side.NODE, NODE_A, b"", {"seq": 1})


def test_a_lost_proposal_is_proposed_again_and_a_repeat_is_published_once(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, event_frames("orders.new", {"n": 1}, id="e1"), 1.0)
    cluster.commit(1.0, drop=True)  # lost with a leader
    # The publisher gave up on b1 and sent the same event to b2; b1 proposes it again too.
    b2.client_message(CLIENT_B, event_frames("orders.new", {"n": 1}, id="e1"), 1.5)
    acks = cluster.commit(2.1)
    for broker in cluster.brokers:
        assert user_events(broker) == [("orders.new", 1, {"n": 1})]
    assert [payload_of(only(a)[2]) for a in acks] == [{"seq": 1}, {"seq": 1}]
    assert b1.take_proposals(5.0) == [] and b2.take_proposals(5.0) == []  # confirmed


def test_a_reserved_topic_is_refused_at_once(cluster: Cluster) -> None:
    b1, _ = cluster.brokers
    _, _, frames = only(b1.client_message(CLIENT, event_frames("mesh.node.up", {}), 1.0))
    assert error_of(frames).code == ErrorCode.ACCESS_DENIED
    assert b1.take_proposals(1.0) == []


def test_the_log_record_leaves_out_the_publishers_token_and_keeps_its_signature() -> None:
    """Never a token in the replicated log; the signature and the sender travel, so a
    subscriber of any broker can check a signed event."""
    published = {"id": "e1", "ts": 1.0, "topic": "t", "metadata": {"k": "v"}, "security": {"token": "s3cret-token"}}
    record = event_record(published, b"\x80")
    assert b"s3cret-token" not in record and b"security" not in record
    assert msgpack.unpackb(record)["event"] == {"id": "e1", "ts": 1.0, "topic": "t", "metadata": {"k": "v"}}
    signed = {**published, "security": {"level": 3, "token": "s3cret-token", "signature": b"s" * 64}}
    event = msgpack.unpackb(event_record(signed, b"\x80", "dev"))["event"]
    assert event["security"] == {"level": 3, "signature": b"s" * 64} and event["sender"] == "dev"


def test_a_snapshot_carries_numbering_and_history_and_leaves_the_brokers_own_topics(cluster: Cluster) -> None:
    b1, _ = cluster.brokers
    for n in range(1, 4):
        b1.client_message(CLIENT, event_frames("orders.new", {"n": n}, id=f"e{n}"), 1.0)
    cluster.commit(1.0)
    snap = cluster.states[0].snapshot()

    fresh = Broker(BrokerConfig(name="b3"))
    fresh.events.emit("mesh.broker.up", {"name": "b3"}, 0.0)
    state = SharedState(events=fresh.events)
    state.restore(snap)
    state.take_effects()  # what the restore asks the broker to reconcile
    assert fresh.events.topics["orders.new"].seq == 3 and fresh.events.topics["mesh.broker.up"].seq == 1
    replay = fresh.events.replay({"prefix": "orders", "after": 1}, 1 << 20)
    assert [msgpack.unpackb(h)["seq"] for h, _ in replay["events"]] == [2, 3]
    # The next committed event continues the numbering; a repeat of one before the snapshot is not published.
    state.apply(state.applied + 1, event_record({"id": "e4", "ts": 2.0, "topic": "orders.new"}, msgpack.packb({"n": 4})))
    state.apply(state.applied + 1, event_record({"id": "e2", "ts": 2.0, "topic": "orders.new"}, msgpack.packb({"n": 2})))
    assert [(e.seq, e.frames is not None) for e in state.take_effects()] == [(4, True), (2, False)]


def test_an_event_too_large_for_the_log_is_refused_and_not_proposed() -> None:
    """A log entry is at most MAX_PROPOSAL_BYTES: on brokers that take larger messages,
    a larger event is refused before it is proposed."""
    cluster = Cluster(max_message_bytes=2 * MAX_PROPOSAL_BYTES)
    b1, _ = cluster.brokers
    big = b"x" * (MAX_PROPOSAL_BYTES + 1)
    _, _, frames = only(b1.client_message(CLIENT, event_frames("orders.new", big), 1.0))
    err = error_of(frames)
    assert err.code == ErrorCode.MESSAGE_TOO_LARGE and err.details["limit"] == MAX_PROPOSAL_BYTES
    assert b1.take_proposals(1.0) == []
    # Just under the limit goes through the log.
    b1.client_message(CLIENT, event_frames("orders.new", b"x" * (MAX_PROPOSAL_BYTES - 1024), id="e2"), 1.0)
    cluster.commit(1.0)
    assert [seq for _, seq, _ in user_events(b1)] == [1]

