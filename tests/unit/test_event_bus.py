"""The broker's event bus without sockets: sequencing, retention, replay, upstream messages."""

from __future__ import annotations

import msgpack
import pytest

from mesh.broker.events import EventBus, RetentionRule
from mesh.protocol import (
    AccessDeniedError,
    ResourceExhaustedError,
    ValidationFailedError,
    decode_header,
    decode_payload,
    encode_event_header,
    encode_payload,
    unpack_header,
)
from mesh.protocol.topics import CONTROL, covers, subscription_filter, topic_frame


def wire(topic: str, i: int = 0, **meta: object) -> dict:
    return unpack_header(encode_event_header(topic, id=f"e{i}", now=float(i), metadata=meta or None))


def publish(bus: EventBus, topic: str, body: object = None, i: int = 0) -> int:
    seq, _ = bus.publish(wire(topic, i), encode_payload(body))
    return seq


def replayed(answer: dict) -> list[tuple[str, int, object]]:
    out = []
    for header, payload in answer["events"]:
        h = decode_header(header)
        out.append((h.topic, h.seq, decode_payload(payload)))
    return out


def test_each_topic_counts_from_one() -> None:
    """Sequence numbers are per topic, consecutive, starting at 1."""
    bus = EventBus()
    assert [publish(bus, "a") for _ in range(3)] == [1, 2, 3]
    assert publish(bus, "b") == 1
    assert publish(bus, "a.x") == 1
    assert publish(bus, "a") == 4


def test_published_frames_carry_topic_seq_and_untouched_payload() -> None:
    """Frame 0 is the topic and a dot; the header gets the seq; the payload bytes are the publisher's."""
    bus = EventBus()
    payload = encode_payload({"k": [1, 2]})
    seq, frames = bus.publish(wire("orders.new", 7, source="shop"), payload)
    assert frames[0] == b"orders.new."
    h = decode_header(frames[1])
    assert (h.topic, h.seq, h.id, h.timestamp, dict(h.metadata)) == ("orders.new", seq, "e7", 7.0, {"source": "shop"})
    assert frames[2] is payload


def test_publisher_token_never_reaches_subscribers() -> None:
    """A publisher's token stays with the broker; its level, encryption and signature pass on,
    so that subscribers can check and decrypt."""
    bus = EventBus()
    sec = {"level": 3, "token": "secret-token", "encryption": {"kid": "k1"}, "signature": b"s" * 64}
    _, frames = bus.publish({**wire("a"), "security": sec}, b"\xc0")
    assert b"secret-token" not in frames[1]
    assert unpack_header(frames[1])["security"] == {"level": 3, "encryption": {"kid": "k1"}, "signature": b"s" * 64}


def test_the_broker_names_the_publisher_and_nobody_else_can() -> None:
    """The stamped `sender` is the name the broker gives (the link's), never the publisher's own,
    and it is kept for replay."""
    bus = EventBus()
    _, frames = bus.publish({**wire("a"), "sender": "admin"}, b"\xc0", sender="alice")
    assert unpack_header(frames[1])["sender"] == "alice"
    _, frames = bus.publish({**wire("a"), "sender": "admin"}, b"\xc0")
    assert "sender" not in unpack_header(frames[1])
    replayed = bus.replay({"prefix": "a"}, 10**6)["events"]
    assert unpack_header(replayed[0][0])["sender"] == "alice"


def test_broker_topics_are_reserved() -> None:
    """Nobody but the broker publishes on mesh.* topics."""
    bus = EventBus()
    for topic in ("mesh", "mesh.node.up"):
        with pytest.raises(AccessDeniedError):
            publish(bus, topic)
    assert publish(bus, "meshy") == 1


def test_new_topics_are_refused_beyond_the_limit() -> None:
    """max_topics bounds the topic table; existing topics keep working."""
    bus = EventBus(max_topics=2)
    publish(bus, "a")
    publish(bus, "b")
    with pytest.raises(ResourceExhaustedError):
        publish(bus, "c")
    assert publish(bus, "a") == 2


def test_the_brokers_own_topics_do_not_count_toward_the_limit() -> None:
    """Brokers of a cluster emit different mesh.* events; they must still refuse the same published ones."""
    bus = EventBus(max_topics=2)
    bus.emit("mesh.node.up", {}, 0.0)
    publish(bus, "a")
    bus.emit("mesh.node.down", {}, 0.0)
    publish(bus, "b")
    with pytest.raises(ResourceExhaustedError):
        publish(bus, "c")
    restored = EventBus(max_topics=2)
    restored.emit("mesh.node.suspect", {}, 0.0)
    restored.restore_topics(bus.snapshot_topics(1 << 20))
    assert sorted(restored.topics) == ["a", "b", "mesh.node.suspect"]
    with pytest.raises(ResourceExhaustedError):
        publish(restored, "c")


def test_retention_is_bounded_by_count_and_bytes() -> None:
    """Each topic keeps at most max_events and max_bytes; the oldest go first."""
    bus = EventBus([RetentionRule("", max_events=3, max_bytes=10_000)])
    for i in range(5):
        publish(bus, "t", i, i)
    assert [seq for _, seq, _ in replayed(bus.replay({"prefix": "t"}, 10**6))] == [3, 4, 5]
    bus = EventBus([RetentionRule("", max_events=100, max_bytes=300)])
    for i in range(10):
        publish(bus, "t", "x" * 50, i)
    assert bus.retained_bytes <= 300
    kept = replayed(bus.replay({}, 10**6))
    assert kept and kept[-1][1] == 10 and len(kept) < 10


def test_longest_matching_rule_wins_and_uncovered_topics_are_not_kept() -> None:
    """Rules match by prefix; the most specific applies; no rule means nothing retained."""
    bus = EventBus([RetentionRule("audit", 100, 10**6), RetentionRule("audit.login", 1, 10**6)])
    for i in range(3):
        publish(bus, "audit.login", i, i)
        publish(bus, "audit.file", i, i)
        publish(bus, "chat", i, i)
    got = replayed(bus.replay({}, 10**6))
    assert [(t, s) for t, s, _ in got if t == "audit.login"] == [("audit.login", 3)]
    assert [s for t, s, _ in got if t == "audit.file"] == [1, 2, 3]
    assert not [t for t, _, _ in got if t == "chat"]
    assert publish(bus, "chat") == 4  # still sequenced


def test_total_retained_bytes_are_bounded_across_topics() -> None:
    """max_retained_bytes evicts the oldest events of any topic."""
    bus = EventBus(max_retained_bytes=2_000)
    for i in range(100):
        publish(bus, f"t{i % 7}", "y" * 40, i)
    assert bus.retained_bytes <= 2_000
    got = replayed(bus.replay({}, 10**6))
    assert got
    newest_dropped = 100 - len(got)
    assert newest_dropped > 0  # the oldest went, across topics
    assert got[-1][2] == "y" * 40


def test_eviction_bookkeeping_stays_small() -> None:
    """Events dropped by their topic's own bound do not pile up in the cross-topic queue."""
    bus = EventBus([RetentionRule("", max_events=1, max_bytes=10**6)])
    for i in range(10_000):
        publish(bus, "t", i, i)
    assert bus.retained_events == 1
    assert len(bus._oldest) <= 2 * bus.retained_events + 1024


def test_replay_after_a_number_in_publication_order() -> None:
    """Replay gives every covered topic's events after the position, in the order they were published."""
    bus = EventBus()
    publish(bus, "o.a", "a1")
    publish(bus, "o.b", "b1")
    publish(bus, "o.a", "a2")
    publish(bus, "other", "x")
    answer = bus.replay({"prefix": "o", "after": 0}, 10**6)
    assert replayed(answer) == [("o.a", 1, "a1"), ("o.b", 1, "b1"), ("o.a", 2, "a2")]
    assert answer["gaps"] == [] and answer["more"] is False
    answer = bus.replay({"prefix": "o", "after": 1}, 10**6)
    assert replayed(answer) == [("o.a", 2, "a2")]
    answer = bus.replay({"prefix": "o", "positions": {"o.a": 2}}, 10**6)
    assert replayed(answer) == [("o.b", 1, "b1")]


def test_replay_pages_by_size() -> None:
    """An answer holds at most limit_bytes of events (at least one) and says there is more."""
    bus = EventBus()
    for i in range(10):
        publish(bus, "t", "z" * 100, i)
    answer = bus.replay({"prefix": "t"}, 350)
    assert 1 <= len(answer["events"]) < 10 and answer["more"] is True
    last = decode_header(answer["events"][-1][0]).seq
    rest = bus.replay({"prefix": "t", "after": last}, 10**6)
    assert [s for _, s, _ in replayed(rest)] == list(range(last + 1, 11)) and rest["more"] is False


def test_replay_older_than_the_window_names_the_first_available() -> None:
    """Asking for evicted events gets a gap with the first sequence number still kept."""
    bus = EventBus([RetentionRule("", max_events=2, max_bytes=10**6)])
    for i in range(5):
        publish(bus, "t", i, i)
    answer = bus.replay({"prefix": "t", "after": 1}, 10**6)
    assert answer["gaps"] == [{"topic": "t", "after": 1, "first": 4}]
    assert [s for _, s, _ in replayed(answer)] == [4, 5]
    assert bus.replay({"prefix": "t", "after": 3}, 10**6)["gaps"] == []


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ([], "payload"),
        ({"prefix": "a..b"}, "prefix"),
        ({"after": -1}, "after"),
        ({"after": True}, "after"),
        ({"positions": {"a": "1"}}, "positions"),
        ({"positions": [1]}, "positions"),
        ({"since": 1}, "since"),
    ],
)
def test_bad_replay_requests_name_the_field(request_: object, field: str) -> None:
    """A malformed replay request is refused, naming the field."""
    with pytest.raises(ValidationFailedError) as info:
        EventBus().replay(request_, 1000)
    assert info.value.details["field"] == field


def test_sync_marker_is_published_on_the_request_filter_and_names_refusals() -> None:
    """A sync marker goes out on the subscriber's own control filter, with what was refused."""
    bus = EventBus(name="b1")
    marker = bus.sync_marker(CONTROL + b"abc", 1.0)
    assert marker[0] == CONTROL + b"abc"
    assert decode_payload(marker[2]) == {"broker": "b1", "epoch": bus.epoch}
    refused = [{"filter": "x", "code": 2002, "reason": "no"}]
    assert decode_payload(bus.sync_marker(CONTROL + b"abc", 1.0, refused)[2])["refused"] == refused


def test_subscriber_reports_are_kept_bounded_and_bad_ones_counted() -> None:
    """Drop reports land per subscriber; garbage is counted, never raised."""
    bus = EventBus()
    bus.report(msgpack.packb({"sub": "s1", "prefix": "a", "received": 10, "missed": 3}), 1.0)
    bus.report(msgpack.packb({"sub": "s1", "prefix": "a", "received": 20, "missed": 4}), 2.0)
    for bad in (b"\x92garbage", msgpack.packb({"sub": 1}), msgpack.packb({"sub": "s", "prefix": "", "received": -1, "missed": 0}), b""):
        bus.report(bad, 3.0)
    assert bus.stats()["subscribers"] == {"s1": {"prefix": "a", "received": 20, "missed": 4}}
    assert bus.counters["bad_reports"] == 4
    bus.forget_quiet(400.0, 300.0)
    assert bus.stats()["subscribers"] == {}


def test_topic_frames_match_whole_segments() -> None:
    """The filter for a prefix matches that topic and those below it, never a longer name."""
    flt = subscription_filter("orders")
    assert topic_frame("orders").startswith(flt)
    assert topic_frame("orders.new").startswith(flt)
    assert not topic_frame("orders2").startswith(flt)
    assert subscription_filter("") == b""
    assert covers("orders", "orders.new") and covers("", "x") and not covers("orders", "orders2")


def test_a_cluster_snapshot_keeps_every_topics_number_and_the_newest_events_within_its_bound() -> None:
    bus = EventBus()
    for i in range(10):
        publish(bus, "a" if i % 2 else "b", "x" * 100, i)
    bus.emit("mesh.node.up", {"name": "n"}, 0.0)
    one = bus.topics["a"].bytes // 5  # the size of one event: they are all alike
    snap = bus.snapshot_topics(3 * one + one // 2)
    assert snap["seqs"] == {"a": 5, "b": 5}  # not the broker's own mesh.* topic
    assert [(t, q) for t, q, _, _ in snap["history"]] == [("a", 4), ("b", 5), ("a", 5)]

    other = EventBus()
    publish(other, "c", 1)
    other.emit("mesh.node.up", {"name": "m"}, 0.0)
    other.restore_topics(snap)
    assert {n: t.seq for n, t in other.topics.items()} == {"a": 5, "b": 5, "mesh.node.up": 1}
    assert other.retained_events == 4 and other.retained_bytes == sum(t.bytes for t in other.topics.values())
    answer = other.replay({"prefix": "", "after": 0}, 1 << 20)
    assert [(t, q) for t, q, _ in replayed(answer)] == [("mesh.node.up", 1), ("a", 4), ("b", 5), ("a", 5)]
    assert publish(other, "a") == 6


def test_a_damaged_cluster_snapshot_is_refused() -> None:
    with pytest.raises(ValueError, match="damaged event snapshot"):
        EventBus().restore_topics({"seqs": {"a": "x"}, "history": []})
