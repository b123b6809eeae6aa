"""A subscription's core without sockets: gaps, resets, replay pages and the seam to the live stream."""

from __future__ import annotations

import msgpack
import pytest

from mesh.broker.events import EventBus, RetentionRule
from mesh.protocol import ValidationFailedError, encode_event_header, encode_payload, unpack_header
from mesh.protocol.topics import CONTROL, REPORT
from mesh.subscription import Event, Gap, SubscriptionState


class Feed:
    """A bus and the frames it published, so the state sees what a broker would send."""

    def __init__(self, **kwargs: object) -> None:
        self.bus = EventBus(**kwargs)  # type: ignore[arg-type]
        self.n = 0

    def publish(self, topic: str, body: object = None) -> list[bytes]:
        self.n += 1
        header = unpack_header(encode_event_header(topic, id=f"e{self.n}", now=float(self.n)))
        return self.bus.publish(header, encode_payload(body))[1]

    def sync(self, state: SubscriptionState) -> None:
        """Deliver the marker the broker sends for the state's control filter."""
        marker = self.bus.sync_marker(state.filters()[-1][1:], 0.0)
        items, upstream = state.on_message(marker, 0.0)
        assert items == [] and upstream == [b"\x00" + state.control] and state.synced

    def replay(self, state: SubscriptionState, limit: int = 10**6) -> list[Event | Gap]:
        out: list[Event | Gap] = []
        more = True
        while more:
            items, more = state.on_replay(self.bus.replay(state.replay_request(), limit), 0.0)
            out.extend(items)
        return out


def live(state: SubscriptionState, frames: list[bytes]) -> list[Event | Gap]:
    items, upstream = state.on_message(frames, 0.0)
    assert upstream == []
    return items


def seqs(items: list[Event | Gap]) -> list[int]:
    return [i.seq for i in items if isinstance(i, Event)]


def test_filters_put_the_prefix_before_the_control_filter() -> None:
    """The broker must see the real filter first, so the marker proves it is in force."""
    state = SubscriptionState("orders", None)
    assert state.filters() == [b"\x01orders.", b"\x01" + state.control]
    assert state.control.startswith(CONTROL)
    assert SubscriptionState("", None).filters()[0] == b"\x01"


def test_bad_prefix_and_from_seq_are_refused() -> None:
    """A prefix that is not a topic, or a negative from_seq, fails before any socket opens."""
    with pytest.raises(ValidationFailedError):
        SubscriptionState("a..b", None)
    with pytest.raises(ValueError):
        SubscriptionState("a", -1)


def test_consecutive_events_pass_and_a_jump_is_a_gap() -> None:
    """A jump in a topic's numbers yields a Gap (counted) before the next event."""
    feed, state = Feed(), SubscriptionState("", None)
    frames = [feed.publish("t", i) for i in range(6)]
    got = live(state, frames[0]) + live(state, frames[1]) + live(state, frames[4]) + live(state, frames[5])
    assert seqs(got) == [1, 2, 5, 6]
    assert [i for i in got if isinstance(i, Gap)] == [Gap("t", 3, 4, "dropped")]
    assert (state.received, state.missed) == (4, 2)
    assert state.positions == {"t": 6}


def test_topics_are_checked_separately() -> None:
    """Interleaved topics each keep their own sequence."""
    feed, state = Feed(), SubscriptionState("", None)
    got = []
    for topic in ("a", "b", "a", "b", "a"):
        got += live(state, feed.publish(topic))
    assert not [i for i in got if isinstance(i, Gap)]
    assert state.positions == {"a": 3, "b": 2}


def test_lower_number_means_the_broker_restarted() -> None:
    """Numbering that starts again is reported as a reset, and followed from there."""
    state = SubscriptionState("", None)
    old, new = Feed(), Feed()
    for _ in range(3):
        live(state, old.publish("t"))
    new.publish("t")
    got = live(state, new.publish("t"))
    assert got[0] == Gap("t", 1, 1, "reset") and seqs(got) == [2]


def test_other_subscribers_markers_and_short_messages_are_ignored() -> None:
    """A '' filter also receives other subscribers' markers; they are not events."""
    feed, state = Feed(), SubscriptionState("", None)
    other = SubscriptionState("", None)
    marker = feed.bus.sync_marker(other.filters()[-1][1:], 0.0)
    assert state.on_message(marker, 0.0) == ([], []) and not state.synced
    assert state.on_message([b"t.", b"x"], 0.0) == ([], [])
    assert state.malformed == 1


def test_replay_then_live_has_no_duplicate_and_no_hole() -> None:
    """Events published before and after the marker arrive once each, in order."""
    feed = Feed()
    for i in range(5):
        feed.publish("t", i)
    state = SubscriptionState("t", 2)
    early = feed.publish("t", 5)  # reaches the socket before the marker: the replay has it
    assert state.on_message(early, 0.0) == ([], [])
    feed.sync(state)
    during = [feed.publish("t", i) for i in (6, 7)]  # after the marker, before the replay answer
    got = feed.replay(state, limit=120)  # small pages: several round trips
    after = feed.publish("t", 8)
    for frames in [*during, after]:
        got += live(state, frames)
    assert seqs(got) == [3, 4, 5, 6, 7, 8, 9]
    assert [i.payload for i in got if isinstance(i, Event)] == [2, 3, 4, 5, 6, 7, 8]
    assert not [i for i in got if isinstance(i, Gap)] and state.missed == 0


def test_replay_older_than_the_window_is_one_expired_gap() -> None:
    """From a number the broker no longer keeps: a Gap naming the first kept, then the rest."""
    feed = Feed(rules=[RetentionRule("", 3, 10**6)])
    for i in range(10):
        feed.publish("t", i)
    state = SubscriptionState("t", 2)
    feed.sync(state)
    got = feed.replay(state)
    assert got[0] == Gap("t", 3, 7, "expired")
    assert seqs(got) == [8, 9, 10] and state.missed == 5


def test_resume_from_positions_of_several_topics() -> None:
    """A map of positions resumes each topic where it was; unnamed topics start from the window."""
    feed = Feed()
    for topic in ("a", "b", "a", "b", "c"):
        feed.publish(topic)
    state = SubscriptionState("", {"a": 2, "b": 1})
    feed.sync(state)
    got = feed.replay(state)
    assert [(i.topic, i.seq) for i in got if isinstance(i, Event)] == [("b", 2), ("c", 1)]


def test_report_is_throttled_and_carries_the_counts() -> None:
    """Reports go out when counts change, at most once a second unless forced."""
    feed, state = Feed(), SubscriptionState("x", None)
    assert state.report(10.0) == []
    live(state, feed.publish("x"))
    first = state.report(10.0)
    assert len(first) == 1 and first[0].startswith(b"\x01" + REPORT)
    assert msgpack.unpackb(first[0][1 + len(REPORT):]) == {"sub": state.id, "prefix": "x", "received": 1, "missed": 0}
    live(state, feed.publish("x"))
    assert state.report(10.5) == []
    second = state.report(10.5, force=True)
    assert second[1] == b"\x00" + first[0][1:]  # the report before is unsubscribed: libzmq keeps one
    assert state.report(12.0) == []  # nothing changed since


def test_a_refused_event_is_a_gap_never_an_event(tmp_path) -> None:
    """An event claiming a signature that does not verify with its stamped sender's key is
    never delivered: it is a one-event "refused" gap, and the next event follows without a
    "dropped" gap. A good one is delivered."""
    from nacl.signing import SigningKey

    from mesh.protocol import SignatureInvalidError
    from mesh.security.envelope import Opener
    from mesh.security.signing import SignerStore, sign

    alice, mallory = SigningKey.generate(), SigningKey.generate()
    (tmp_path / "alice.pub").write_text(bytes(alice.verify_key).hex() + "\n")
    feed = Feed()
    state = SubscriptionState("", None, Opener(signers=SignerStore(tmp_path)))
    feed.sync(state)

    def signed_event(key: SigningKey, n: int) -> list[bytes]:
        header = unpack_header(encode_event_header("t", id=f"s{n}", now=float(n)))
        header["security"] = {"level": 3}
        payload = encode_payload({"n": n})
        header["security"]["signature"] = sign(key, header, payload)
        return feed.bus.publish(header, payload, sender="alice")[1]

    bad, good = live(state, signed_event(mallory, 1)), live(state, signed_event(alice, 2))
    assert [type(i) for i in bad] == [Gap] and (bad[0].first, bad[0].last, bad[0].reason) == (1, 1, "refused")
    assert isinstance(bad[0].error, SignatureInvalidError) and bad[0].error.details["reason"] == "does not verify"
    assert [(type(i), i.seq) for i in good] == [(Event, 2)] and good[0].payload == {"n": 2}
    assert (state.refused, state.received, state.missed) == (1, 1, 0)
