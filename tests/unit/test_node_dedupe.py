"""Resent commands do not run twice: the node's memory of command ids, and the broker's of answers.

`CommandDedupe` (the node's) and `RecentReplies` (the bounded store both use) are
sans-IO and driven here with a fake clock; the broker's part goes through `Broker`.
"""

from __future__ import annotations

from mesh.broker import Broker, BrokerConfig, Side
from mesh.link.replies import RecentReplies
from mesh.node.core import CommandDedupe, Seen, command_key
from mesh.protocol import HandlerNotFoundError, ResourceExhaustedError
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    command_frames,
    dispatched_ids,
    error_reply,
    header_of,
    only,
    register,
    reply,
)

ENV_1 = b"client-via-broker-1"
ENV_2 = b"client-via-broker-2"
ANSWER = [ENV_1, b"header", b"payload"]


# --------------------------------------------------------------- the bounded store


def test_recent_replies_keep_frames_until_they_age_out() -> None:
    """A reply is served while younger than max_age, and `expire` forgets it after."""
    store = RecentReplies(10, 5.0, 1000)
    frames = [b"h", b"p"]
    store.put("k", frames, 0.0)
    assert store.get("k", 5.0) is frames
    assert store.get("k", 5.1) is None
    store.expire(5.1)
    assert len(store) == 0 and store.bytes == 0


def test_recent_replies_drop_the_oldest_past_the_count_limit() -> None:
    """With max_entries 2, the third reply pushes out the first."""
    store = RecentReplies(2, 60.0, 1000)
    for i, key in enumerate("abc"):
        store.put(key, [b"x"], float(i))
    assert store.get("a", 3.0) is None
    assert store.get("b", 3.0) == [b"x"] and store.get("c", 3.0) == [b"x"]


def test_recent_replies_drop_the_oldest_past_the_byte_limit_and_skip_giants() -> None:
    """The byte budget evicts oldest first, and a reply bigger than the whole budget is not kept."""
    store = RecentReplies(100, 60.0, 10)
    store.put("a", [b"12345"], 0.0)
    store.put("b", [b"123", b"45"], 1.0)
    store.put("c", [b"1"], 2.0)
    assert store.get("a", 2.0) is None and store.bytes == 6
    store.put("giant", [b"x" * 11], 3.0)
    assert store.get("giant", 3.0) is None and len(store) == 2


def test_recent_replies_replace_an_entry_for_the_same_key() -> None:
    """Storing a key again replaces its frames and its byte count."""
    store = RecentReplies(10, 60.0, 100)
    store.put("k", [b"old-old"], 0.0)
    store.put("k", [b"new"], 1.0)
    assert store.get("k", 1.0) == [b"new"] and store.bytes == 3 and len(store) == 1


def test_expire_stops_at_the_first_young_entry() -> None:
    """Expiry walks from the oldest and stops at the first reply still young enough."""
    store = RecentReplies(10, 5.0, 100)
    for t in (0.0, 1.0, 2.0, 8.0):
        store.put(t, [b"x"], t)
    store.expire(6.5)
    assert len(store) == 2 and store.get(2.0, 6.5) == [b"x"]


# ------------------------------------------------------------------- the node


def test_a_new_command_runs_and_its_reply_is_served_to_a_resend() -> None:
    """After finishing, the same id is DONE: the stored reply comes back with the resend's envelope."""
    dedupe = CommandDedupe()
    assert dedupe.admit("c1", ENV_1, 0.0) == (Seen.NEW, None)
    dedupe.start("c1")
    assert dedupe.finish("c1", ANSWER, 1.0, remember=True) == []
    assert dedupe.admit("c1", ENV_2, 2.0) == (Seen.DONE, [ENV_2, b"header", b"payload"])


def test_a_resend_of_a_running_command_gets_the_first_copys_reply() -> None:
    """While c1 runs, resends wait; when it finishes, each gets the reply under its own envelope."""
    dedupe = CommandDedupe()
    dedupe.admit("c1", ENV_1, 0.0)
    dedupe.start("c1")
    assert dedupe.admit("c1", ENV_2, 0.5) == (Seen.RUNNING, None)
    assert dedupe.admit("c1", ENV_1, 0.6) == (Seen.RUNNING, None)
    assert dedupe.finish("c1", ANSWER, 1.0, remember=True) == [
        [ENV_2, b"header", b"payload"],
        [ENV_1, b"header", b"payload"],
    ]
    assert dedupe.running == {}


def test_outcomes_of_commands_that_never_started_are_not_remembered() -> None:
    """A refusal (remember=False) still answers the waiting resends, but a later resend runs."""
    dedupe = CommandDedupe()
    dedupe.admit("c1", ENV_1, 0.0)
    dedupe.start("c1")
    dedupe.admit("c1", ENV_2, 0.1)
    assert len(dedupe.finish("c1", ANSWER, 0.2, remember=False)) == 1
    assert dedupe.admit("c1", ENV_2, 0.3) == (Seen.NEW, None)


def test_the_node_forgets_command_ids_after_max_age() -> None:
    """Past max_age the id is new again; `expire` frees the memory."""
    dedupe = CommandDedupe(max_age=300.0)
    dedupe.admit("c1", ENV_1, 0.0)
    dedupe.start("c1")
    dedupe.finish("c1", ANSWER, 0.0, remember=True)
    assert dedupe.admit("c1", ENV_1, 300.0)[0] is Seen.DONE
    assert dedupe.admit("c1", ENV_1, 300.5)[0] is Seen.NEW
    dedupe.expire(300.5)
    assert len(dedupe.replies) == 0


def test_the_node_remembers_at_most_max_entries_ids() -> None:
    """Memory is bounded by count: the oldest outcome goes first."""
    dedupe = CommandDedupe(max_entries=3)
    for i in range(5):
        cid = f"c{i}"
        dedupe.admit(cid, ENV_1, float(i))
        dedupe.start(cid)
        dedupe.finish(cid, ANSWER, float(i), remember=True)
    assert len(dedupe.replies) == 3
    assert [dedupe.admit(f"c{i}", ENV_1, 5.0)[0] for i in range(5)] == [Seen.NEW] * 2 + [Seen.DONE] * 3


def test_a_stored_reply_goes_only_to_the_same_action_and_token() -> None:
    """Ids are not secret: another token, or another action, with the same id is a new command."""
    def key(token: str | None, action: str = "say") -> tuple:
        security = {"token": token} if token is not None else None
        return command_key({"id": "c1", "service": "echo", "action": action, "security": security})

    dedupe = CommandDedupe()
    dedupe.admit(key("alice"), ENV_1, 0.0)
    dedupe.start(key("alice"))
    dedupe.finish(key("alice"), ANSWER, 0.0, remember=True)
    assert dedupe.admit(key("alice"), ENV_2, 1.0)[0] is Seen.DONE
    assert dedupe.admit(key("mallory"), ENV_2, 1.0)[0] is Seen.NEW
    assert dedupe.admit(key(None), ENV_2, 1.0)[0] is Seen.NEW
    assert dedupe.admit(key("alice", "shout"), ENV_2, 1.0)[0] is Seen.NEW


# ------------------------------------------------------------------- the broker


def test_a_resend_of_an_answered_command_gets_the_same_reply_without_running() -> None:
    """The broker answers a resend of c1 from memory: same frames, no second dispatch."""
    broker = Broker()
    register(broker, NODE_A, {"echo": ["say"]})
    _, _, dispatch = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    _, _, first = only(broker.node_message(NODE_A, reply(dispatch, "hi"), 2.0))
    side, ident, again = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 3.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert again == first and again[0] is first[0]
    assert broker.counters["replayed"] == 1 and broker.counters["dispatched"] == 1


def test_a_remembered_node_error_is_replayed_too() -> None:
    """An error the node answered after looking at the command is an outcome like any other."""
    broker = Broker()
    register(broker, NODE_A, {"echo": ["say"]})
    _, _, dispatch = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    broker.node_message(NODE_A, error_reply(dispatch, HandlerNotFoundError("gone")), 2.0)
    _, _, again = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 3.0))
    assert header_of(again).error is not None and broker.counters["replayed"] == 1


def test_errors_that_prove_the_command_never_ran_are_not_remembered() -> None:
    """The client retries RESOURCE_EXHAUSTED with the same id: the retry must reach a node."""
    broker = Broker()
    register(broker, NODE_A, {"echo": ["say"]})
    _, _, dispatch = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    broker.node_message(NODE_A, error_reply(dispatch, ResourceExhaustedError("node is at capacity")), 2.0)
    assert dispatched_ids(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 3.0)) == ["c1"]


def test_the_broker_remembers_per_client_and_for_a_limited_time() -> None:
    """Another client's c1 is its own command; after recent_reply_s the id runs again."""
    broker = Broker(BrokerConfig(recent_reply_s=60.0))
    register(broker, NODE_A, {"echo": ["say"]}, capacity=2)
    _, _, dispatch = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))
    broker.node_message(NODE_A, reply(dispatch), 2.0)
    out = broker.client_message(CLIENT_B, command_frames("echo", "say", id="c1"), 3.0)
    assert dispatched_ids(out) == ["c1"]
    broker.tick(62.5)
    assert len(broker.recent) == 0
    assert dispatched_ids(broker.client_message(CLIENT, command_frames("echo", "say", id="c1", now=63.0), 63.0)) == ["c1"]


def test_the_broker_memory_is_bounded_by_count() -> None:
    """With recent_replies 2, only the two newest answers are remembered."""
    broker = Broker(BrokerConfig(recent_replies=2))
    register(broker, NODE_A, {"echo": ["say"]})
    for i in range(3):
        _, _, dispatch = only(broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), 1.0))
        broker.node_message(NODE_A, reply(dispatch), 1.0)
    assert len(broker.recent) == 2
    assert dispatched_ids(broker.client_message(CLIENT, command_frames("echo", "say", id="c0"), 2.0)) == ["c0"]


def test_a_disabled_dedupe_admits_every_arrival_and_remembers_nothing() -> None:
    """With the table off (tests of the brokers' exactly-once), a resend runs again: the
    node is no longer the guard, so a broker that re-dispatches shows up as a double."""
    dedupe = CommandDedupe(enabled=False)
    assert dedupe.admit("c1", ENV_1, 0.0) == (Seen.NEW, None)
    dedupe.start("c1")
    assert dedupe.admit("c1", ENV_2, 0.1) == (Seen.NEW, None)
    assert dedupe.finish("c1", ANSWER, 0.2, remember=True) == []
    assert dedupe.admit("c1", ENV_2, 0.3) == (Seen.NEW, None) and len(dedupe.replies) == 0
