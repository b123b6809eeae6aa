"""The broker's event bus: sequence numbers, retained history and replay, without sockets.

Rules of this module:

* Every event the broker accepts gets the next sequence number of its topic (1, 2, ...)
  and is kept in the topic's history, within the bounds of the first retention rule
  that covers the topic (events and bytes) and the bus's total byte bound; the oldest
  events go first.
* The bus returns the frames to publish and the loop sends them on its XPUB socket;
  frame 0 follows `protocol/topics.py`.
* Replay answers from the retained history only; what has left it is reported as a gap
  together with the first sequence number still available.
* Subscribers' drop reports are kept here, in a bounded table; their filters are
  decided in `subscribers.py`, which asks this bus for sync markers.
* The `mesh.*` topics are the broker's own (lifecycle events).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..protocol import (
    AccessDeniedError,
    MeshError,
    ResourceExhaustedError,
    ValidationFailedError,
    bounded_unpack,
    check_topic,
    encode_payload,
    encode_stamped_event,
    new_id,
)
from ..protocol.topics import covers, topic_frame

__all__ = ["DEFAULT_RULE", "EventBus", "RetentionRule", "SubscriberReport", "check_publishable"]

SYNC_TOPIC: Final = "mesh.subscribed"
RESERVED: Final = "mesh"
MAX_TOPICS: Final = 10_000
MAX_RETAINED_BYTES: Final = 64 * 1024 * 1024
MAX_SUBSCRIBERS: Final = 10_000
MAX_FIELD: Final = 1100  # longest topic is 16 x 64 characters and 15 dots


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """How much history to keep per topic for the topics under `prefix` ('' = every topic)."""

    prefix: str = ""
    max_events: int = 1000
    max_bytes: int = 1024 * 1024


DEFAULT_RULE: Final = RetentionRule()


@dataclass(slots=True)
class _Retained:
    order: int  # position in the bus's publication order, across topics
    seq: int
    header: bytes
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.header) + len(self.payload)


@dataclass(slots=True)
class _Topic:
    name: str
    rule: RetentionRule
    frame: bytes
    seq: int = 0
    history: deque[_Retained] = field(default_factory=deque)
    bytes: int = 0
    evicted: int = 0


@dataclass(slots=True)
class SubscriberReport:
    """What a subscriber last said about itself (it counts its own gaps)."""

    prefix: str
    received: int
    missed: int
    last_report: float


class EventBus:
    """Sequencing, retention and replay of events, and the subscribers' upstream messages.

    Args:
        rules: retention rules; the longest matching prefix wins, and a topic no rule
            covers is not retained (it still gets sequence numbers).
        max_topics: how many published topics the bus tracks; publishing to one more is
            refused. The broker's own `mesh.*` topics, a fixed handful, do not count, so
            that brokers of a cluster refuse the same committed events.
        max_retained_bytes: bound on all retained history together.
        name: the broker's name, told to subscribers in sync markers.
    """

    def __init__(
        self,
        rules: Iterable[RetentionRule] = (DEFAULT_RULE,),
        *,
        max_topics: int = MAX_TOPICS,
        max_retained_bytes: int = MAX_RETAINED_BYTES,
        name: str = "broker",
    ) -> None:
        self.rules = sorted(rules, key=lambda r: len(r.prefix), reverse=True)
        self.max_topics = max_topics
        self.max_retained_bytes = max_retained_bytes
        self.name = name
        self.epoch = new_id()  # a new one per broker start: sequence numbers restart with it
        self.topics: dict[str, _Topic] = {}
        self._own_topics = 0  # of `topics`, the broker's own (`mesh.*`)
        self.retained_bytes = 0
        self.retained_events = 0
        self.subscribers: dict[str, SubscriberReport] = {}
        self.counters: Counter[str] = Counter()
        self._order = 0
        # (topic, seq) in publication order, for evicting the oldest across topics when
        # the total bound is hit. Entries already evicted by their topic's own bound are
        # skipped when met, and the queue is rebuilt when they pile up.
        self._oldest: deque[tuple[_Topic, int]] = deque()

    # ----------------------------------------------------------------- publish

    def publish(self, published: Mapping[str, Any], payload: bytes, sender: str | None = None) -> tuple[int, list[bytes]]:
        """Sequence an event from a client or node (its validated wire header map).

        `sender` is the publisher's authenticated name (security on), stamped into the
        header so that subscribers can check its signature (retained and replayed with it).

        Returns:
            The event's sequence number and the frames to send to subscribers.

        Raises:
            AccessDeniedError: the topic is one of the broker's own `mesh.*` topics.
            ResourceExhaustedError: a new topic, and the bus already tracks `max_topics`.
        """
        topic: str = published["topic"]
        check_publishable(topic)
        state = self._topic(topic)
        seq = state.seq + 1
        header = encode_stamped_event(published, seq, sender)
        self._append(state, seq, header, payload)
        self.counters["events_published"] += 1
        return seq, [state.frame, header, payload]

    def emit(self, topic: str, body: Any, now: float) -> list[bytes]:
        """Frames of one of the broker's own events (`mesh.node.up`, ...), sequenced and retained."""
        state = self._topic(topic)
        seq = state.seq + 1
        header = encode_stamped_event({"id": new_id(), "ts": now, "topic": topic}, seq)
        payload = encode_payload(body)
        self._append(state, seq, header, payload)
        self.counters["events_emitted"] += 1
        return [state.frame, header, payload]

    def _topic(self, topic: str) -> _Topic:
        state = self.topics.get(topic)
        if state is None:
            own = covers(RESERVED, topic)
            if not own and len(self.topics) - self._own_topics >= self.max_topics:
                self.counters["topics_refused"] += 1
                raise ResourceExhaustedError(
                    f"the broker tracks {self.max_topics} topics already", details={"max_topics": self.max_topics}
                )
            rule = next((r for r in self.rules if covers(r.prefix, topic)), RetentionRule(topic, 0, 0))
            state = self.topics[topic] = _Topic(topic, rule, topic_frame(topic))
            self._own_topics += own
        return state

    def _append(self, state: _Topic, seq: int, header: bytes, payload: bytes) -> None:
        state.seq = seq
        rule = state.rule
        if rule.max_events <= 0:
            return
        self._order += 1
        item = _Retained(self._order, seq, header, payload)
        state.history.append(item)
        state.bytes += item.size
        self.retained_bytes += item.size
        self.retained_events += 1
        self._oldest.append((state, seq))
        while state.history and (len(state.history) > rule.max_events or state.bytes > rule.max_bytes):
            self._evict_head(state)
        while self.retained_bytes > self.max_retained_bytes and self._oldest:
            old, old_seq = self._oldest.popleft()
            if old.history and old.history[0].seq == old_seq:
                self._evict_head(old)
        if len(self._oldest) > 2 * self.retained_events + 1024:
            live = sorted((r.order, t.name, r.seq) for t in self.topics.values() for r in t.history)
            self._oldest = deque((self.topics[name], seq) for _, name, seq in live)

    def _evict_head(self, state: _Topic) -> None:
        item = state.history.popleft()
        state.bytes -= item.size
        state.evicted += 1
        self.retained_bytes -= item.size
        self.retained_events -= 1
        self.counters["events_evicted"] += 1

    # ------------------------------------------------------------ cluster state

    def snapshot_topics(self, max_bytes: int) -> dict[str, Any]:
        """The published (not `mesh.*`) topics' numbering and their newest retained events,
        at most `max_bytes` of them, for a cluster snapshot: `{"seqs": {topic: seq},
        "history": [[topic, seq, header, payload], ...]}` in publication order."""
        seqs = {name: t.seq for name, t in self.topics.items() if not covers(RESERVED, name)}
        newest = sorted(
            ((r.order, name, r) for name in seqs for r in self.topics[name].history), key=lambda x: x[0], reverse=True
        )
        history, size = [], 0
        for _, name, item in newest:
            size += item.size
            if size > max_bytes:
                break
            history.append([name, item.seq, item.header, item.payload])
        history.reverse()
        return {"seqs": seqs, "history": history}

    def restore_topics(self, snap: Mapping[str, Any]) -> None:
        """Replace the published topics by a cluster snapshot's (see `snapshot_topics`);
        the broker's own `mesh.*` topics stay as they are.

        Raises:
            ValueError: a malformed snapshot part.
        """
        try:
            seqs = {str(k): int(v) for k, v in snap["seqs"].items()}
            history = [(str(t), int(q), bytes(h), bytes(p)) for t, q, h, p in snap["history"]]
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ValueError(f"a damaged event snapshot: {exc}") from None
        for name in [n for n in self.topics if not covers(RESERVED, n)]:
            state = self.topics.pop(name)
            self.retained_bytes -= state.bytes
            self.retained_events -= len(state.history)
        # Only the kept topics' events may be evicted while the snapshot's are appended.
        live = sorted((r.order, t.name, r.seq) for t in self.topics.values() for r in t.history)
        self._oldest = deque((self.topics[name], seq) for _, name, seq in live)
        try:
            for name, seq, header, payload in history:
                self._append(self._topic(name), seq, header, payload)
            for name, seq in seqs.items():
                self._topic(name).seq = seq
        except ResourceExhaustedError as exc:
            raise ValueError(f"the event snapshot holds more topics than this broker tracks: {exc}") from None
        live = sorted((r.order, t.name, r.seq) for t in self.topics.values() for r in t.history)
        self._oldest = deque((self.topics[name], seq) for _, name, seq in live)

    # ------------------------------------------------------------------ replay

    def replay(self, request: Any, limit_bytes: int) -> dict[str, Any]:
        """Answer a subscriber's `mesh.replay`: retained events after its positions.

        `request` is `{"prefix": str, "after": int, "positions": {topic: int}}`: the
        events of every topic under `prefix` whose sequence number is greater than the
        topic's entry in `positions`, or than `after` (default 0) for the topics it does
        not name. Events come in
        publication order, at most `limit_bytes` of them per answer (`more` says whether
        to ask again with the positions moved on). A topic whose next event has left the
        history is reported in `gaps` with the first sequence number still available.

        Raises:
            ValidationFailedError: a malformed request, naming the field.
        """
        prefix, after_of = _parse_replay(request)
        gaps: list[dict[str, Any]] = []
        picked: list[_Retained] = []
        for state in self.topics.values():
            if not covers(prefix, state.name):
                continue
            after = after_of(state.name)
            if state.seq <= after:
                continue
            first = state.history[0].seq if state.history else state.seq + 1
            if first > after + 1:
                gaps.append({"topic": state.name, "after": after, "first": first})
            picked.extend(r for r in state.history if r.seq > after)
        picked.sort(key=lambda r: r.order)
        events: list[list[bytes]] = []
        size = 0
        for item in picked:
            if events and size + item.size > limit_bytes:
                break
            events.append([item.header, item.payload])
            size += item.size
        self.counters["replays"] += 1
        return {"events": events, "gaps": gaps, "more": len(events) < len(picked), "epoch": self.epoch}

    # ---------------------------------------------------------------- upstream

    def sync_marker(self, flt: bytes, now: float, refused: list[dict[str, Any]] | None = None) -> list[bytes]:
        """The frames answering a subscriber's sync request `flt` (published on `flt`).

        Once the broker sees the request, every filter the subscriber set before it is
        in force (or refused: `refused` lists those, mesh/broker/subscribers.py), so
        nothing published afterwards can miss it.
        """
        self.counters["syncs"] += 1
        header = encode_stamped_event({"id": new_id(), "ts": now, "topic": SYNC_TOPIC}, 1)
        body: dict[str, Any] = {"broker": self.name, "epoch": self.epoch}
        if refused:
            body["refused"] = refused
        return [flt, header, encode_payload(body)]

    def report(self, frame: bytes, now: float) -> None:
        """A subscriber's drop report (its received and missed counts), kept for monitoring."""
        try:
            raw = bounded_unpack(frame, "report", 8)
            sub, prefix = raw["sub"], raw["prefix"]
            received, missed = raw["received"], raw["missed"]
            if not (isinstance(sub, str) and isinstance(prefix, str) and _counts(received, missed)):
                raise ValueError
        except (MeshError, TypeError, KeyError, ValueError):  # any malformed report
            self.counters["bad_reports"] += 1
            return
        sub, prefix = sub[:MAX_FIELD], prefix[:MAX_FIELD]  # a report cannot grow the table's entries
        if sub not in self.subscribers and len(self.subscribers) >= MAX_SUBSCRIBERS:
            del self.subscribers[next(iter(self.subscribers))]  # forget the longest known
        self.subscribers.pop(sub, None)  # re-inserted last: the table stays in order of age
        self.subscribers[sub] = SubscriberReport(prefix, received, missed, now)
        self.counters["reports"] += 1

    def forget_quiet(self, now: float, idle: float) -> None:
        """Drop reports of subscribers silent for `idle` seconds."""
        for sub in [s for s, r in self.subscribers.items() if now - r.last_report > idle]:
            del self.subscribers[sub]

    # -------------------------------------------------------------------- view

    def stats(self) -> dict[str, Any]:
        """Sizes and counters for monitoring (no payloads)."""
        return {
            "topics": len(self.topics),
            "retained_events": self.retained_events,
            "retained_bytes": self.retained_bytes,
            "subscribers": {
                sub: {"prefix": r.prefix, "received": r.received, "missed": r.missed}
                for sub, r in self.subscribers.items()
            },
            "counters": dict(self.counters),
        }


def check_publishable(topic: str) -> None:
    """Refuse a publisher's event to one of the broker's own `mesh.*` topics.

    Raises:
        AccessDeniedError: a reserved topic.
    """
    if covers(RESERVED, topic):
        raise AccessDeniedError("the mesh.* topics are reserved for the broker", details={"field": "topic", "topic": topic})


def _counts(*values: Any) -> bool:
    return all(type(v) is int and v >= 0 for v in values)


def _parse_replay(request: Any) -> tuple[str, Any]:
    if not isinstance(request, dict):
        raise ValidationFailedError("the replay request must be a map", details={"field": "payload"})
    unknown = set(request) - {"prefix", "after", "positions"}
    if unknown:
        field_name = sorted(map(str, unknown))[0]
        raise ValidationFailedError(f"{field_name}: unknown key", details={"field": field_name})
    prefix = request.get("prefix", "")
    if prefix != "":
        check_topic(prefix, "prefix")
    after = request.get("after", 0)
    if type(after) is not int or after < 0:
        raise ValidationFailedError("after: must be a sequence number, an integer >= 0", details={"field": "after"})
    positions = request.get("positions", {})
    if not isinstance(positions, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in positions.items()
    ):
        raise ValidationFailedError(
            "positions: must map topics to sequence numbers (integers >= 0)", details={"field": "positions"}
        )
    return prefix, lambda topic: positions.get(topic, after)
