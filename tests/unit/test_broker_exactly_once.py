"""Exactly-once commands on two broker cores sharing one replicated log (sans-IO).

The log here is a list both brokers' proposals go into, in the order taken; each
broker's `SharedState` applies it, as the cluster member does once entries commit.
"""

from __future__ import annotations

from typing import Any

import pytest

from mesh.broker import Broker, BrokerConfig, Side
from mesh.broker.core.replicated import MAX_OUTCOME_REPLY_BYTES
from mesh.broker.once import AWAIT_S, once_key
from mesh.protocol import ErrorCode, ResourceExhaustedError, ValidationFailedError
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    NODE_B,
    command_frames,
    error_of,
    error_reply,
    header_of,
    node_system,
    only,
    payload_of,
    registration,
    reply,
    to_clients,
    to_nodes,
)
from mesh.testing.sharedlog import ONCE, Cluster


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster()
    c.register(NODE_A, "inst-a")
    return c


def test_command_runs_after_its_claim_commits_and_answers_after_its_outcome(cluster: Cluster) -> None:
    b1, _ = cluster.brokers
    frames = command_frames("pay", "charge", id="c1", payload={"cents": 5})
    assert b1.client_message(CLIENT, frames, 1.0) == []  # nothing runs before the claim commits
    out1, out2 = cluster.commit()
    side, ident, dispatch = only(out1)
    assert (side, ident) == (Side.NODE, NODE_A) and out2 == []
    assert b1.node_message(NODE_A, reply(dispatch, {"ok": 1}), 1.1) == []  # not before the commit
    out1, out2 = cluster.commit(1.2)
    side, ident, answer = only(out1)
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert header_of(answer).correlation_id == "c1" and payload_of(answer) == {"ok": 1}
    assert out2 == [] and not b1.commands and b1.counters["completed"] >= 1


def test_a_resend_to_another_broker_gets_the_committed_outcome(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    (dispatch,) = [f for _, _, f in cluster.commit()[0]]
    b1.node_message(NODE_A, reply(dispatch, "charged"), 1.1)
    cluster.commit(1.2)
    out = b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 2.0)
    assert to_nodes(out) == []
    assert payload_of(only(out)[2]) == "charged" and b2.counters["once_replayed"] == 1


def test_a_resend_whose_outcome_was_dropped_for_room_is_refused_not_run_again(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    for state in cluster.states:
        state.max_outcome_bytes = 1  # keep only the newest outcome
    for cid in ("c1", "c2"):
        b1.client_message(CLIENT, command_frames("pay", "charge", id=cid), 1.0)
        (dispatch,) = [f for _, _, f in cluster.commit()[0]]
        b1.node_message(NODE_A, reply(dispatch, "charged"), 1.1)
        cluster.commit(1.2)
    out = b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 2.0)
    assert to_nodes(out) == [] and b2.take_proposals(2.0) == []
    err = error_of(only(out)[2])
    assert err.code == ErrorCode.INVALID_STATE and err.details == {"exactly_once": True, "outcome": "forgotten"}
    assert payload_of(only(b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c2"), 2.0))[2]) == "charged"


def test_a_late_outcome_of_a_forgotten_command_is_proposed_once() -> None:
    """c1's claim is pushed out of the log's table (room for one key) while c1 runs: its
    reply is proposed once, every broker hears it is forgotten, and its caller is refused."""
    cluster = Cluster()
    cluster.register(NODE_A, "inst-a")
    for state in cluster.states:
        state.max_commands = 1
    b1, _ = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    first = only(cluster.commit()[0])
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c2"), 2.0)
    assert len(to_nodes(cluster.commit(2.0)[0])) == 1  # c2's claim pushes c1's out
    assert b1.node_message(NODE_A, reply(first[2], "done"), 2.5) == []
    out1, out2 = cluster.commit(2.6)
    err = error_of(only(out1)[2])
    assert err.details == {"exactly_once": True, "outcome": "forgotten"} and out2 == []
    assert b1.take_proposals(10.0) == []  # not proposed again every second


def test_a_reply_too_large_for_the_log_commits_as_an_error_that_says_it_ran() -> None:
    cluster = Cluster(max_message_bytes=8 * 1024 * 1024)
    cluster.register(NODE_A, "inst-a")
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    (dispatch,) = [f for _, _, f in cluster.commit()[0]]
    b1.node_message(NODE_A, reply(dispatch, "x" * (MAX_OUTCOME_REPLY_BYTES + 1)), 1.1)
    side, ident, answer = only(cluster.commit(1.2)[0])
    err = error_of(answer)
    assert (ident, err.code, err.details["exactly_once"]) == (CLIENT, ErrorCode.MESSAGE_TOO_LARGE, True)
    assert "ran" in err.message and b1.take_proposals(10.0) == []
    resend = error_of(only(b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 2.0))[2])
    assert resend.code == ErrorCode.MESSAGE_TOO_LARGE  # the same committed answer, and not run again


def test_a_resend_to_another_broker_while_it_runs_waits_for_the_outcome(cluster: Cluster) -> None:
    """Invariant: only the broker run whose claim is committed sends the command. A resend
    through b2 while b1's node runs it is not sent again (the node's table is not relied
    on); it gets the outcome b1 commits."""
    b1, b2 = cluster.brokers
    cluster.register(NODE_B, "inst-b", capacity=10)  # emptier: plain routing would pick it
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    side, claimed, first = only(cluster.commit()[0])
    assert b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 1.1) == []
    assert b2.counters["once_awaited"] == 1 and b2.take_proposals(1.1) == []
    b1.node_message(claimed, reply(first, "done"), 1.15)
    out1, out2 = cluster.commit(1.2)
    assert [payload_of(f) for _, _, f in to_clients(out1)] == ["done"]
    assert [payload_of(f) for _, _, f in to_clients(out2)] == ["done"]
    assert b1.counters["once_dispatched"] + b2.counters["once_dispatched"] == 1


def test_a_resend_waiting_on_a_silent_claimant_is_told_the_outcome_is_unknown(cluster: Cluster) -> None:
    """b1 holds c1's claim and goes silent (paused) before sending it: a resend through b2
    is not sent (only b1 may), and after AWAIT_S its caller hears NETWORK with
    `outcome: unknown` instead of waiting to its deadline. Once b1 runs c1, a later resend
    through b2 gets the outcome."""
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    cluster.log.extend(b1.take_proposals(1.0))  # the claim reached the leader; b1 pauses
    assert b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 2.0) == []
    assert cluster.commit(2.0, paused=frozenset({0})) == [[], []]
    assert b2.tick(2.0 + AWAIT_S / 2) == []
    err = error_of(only(to_clients(b2.tick(2.0 + AWAIT_S)))[2])
    assert err.code == ErrorCode.NETWORK and err.details == {"exactly_once": True, "claimed_by": "b1", "outcome": "unknown"}
    (_, _, sent), = to_nodes(cluster.commit(3.0)[0])  # b1 resumes and sends it, once
    b1.node_message(NODE_A, reply(sent, "done"), 3.1)
    cluster.commit(3.2)
    assert payload_of(only(b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 4.0))[2]) == "done"


def test_a_resend_arriving_long_after_the_claim_committed_is_told_at_once(cluster: Cluster) -> None:
    """A claim committed AWAIT_S ago with no outcome (its broker silent since): a resend
    through another broker is answered `outcome: unknown` on arrival, not after a wait."""
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    cluster.log.extend(b1.take_proposals(1.0))
    cluster.commit(1.0, paused=frozenset({0}))
    err = error_of(only(b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 1.0 + AWAIT_S))[2])
    assert err.details["outcome"] == "unknown" and b2.counters["once_dispatched"] == 0


def test_the_nodes_copy_of_a_reply_lets_another_broker_commit_when_the_sender_died(cluster: Cluster) -> None:
    """b1 sends c1 and dies before the node's reply reaches it; the node sends its reply to
    an exactly-once command to every broker, so b2 keeps a copy, and when the client's
    resend waits there b2 commits it as the outcome: answered, and not run again."""
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    (dispatch,) = [f for _, _, f in to_nodes(cluster.commit(1.0)[0])]
    cluster.restart(0, run=2)  # b1 is killed and restarted: its run's waiters are gone
    assert b2.node_message(NODE_A, reply(dispatch, "charged"), 1.1) == []  # a copy, kept
    assert b2.counters["unexpected_replies"] == 0 and b2.take_proposals(1.1) == []
    assert b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 1.2) == []
    out = cluster.commit(1.3)
    assert [payload_of(f) for _, _, f in to_clients(out[1])] == ["charged"]
    assert to_nodes(out[0] + out[1]) == []


def test_a_resend_on_another_connection_to_the_same_broker_is_not_sent_twice(cluster: Cluster) -> None:
    """Two copies of one command wait on one broker when its claim commits: one is sent,
    both get the one outcome."""
    b1, _ = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    b1.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 1.0)
    (dispatch,) = [f for _, _, f in to_nodes(cluster.commit()[0])]
    b1.node_message(NODE_A, reply(dispatch, "done"), 1.1)
    answers = to_clients(cluster.commit(1.2)[0])
    assert sorted(ident for _, ident, _ in answers) == sorted([CLIENT, CLIENT_B])
    assert {payload_of(f) for _, _, f in answers} == {"done"}


def test_a_restarted_broker_does_not_send_a_claim_of_its_earlier_run(cluster: Cluster) -> None:
    """b1 claims and sends c1, then restarts (a new incarnation, the log replayed): a resend
    to it waits for the outcome instead of sending c1 again."""
    b1, _ = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    (dispatch,) = [f for _, _, f in to_nodes(cluster.commit()[0])]
    reborn = cluster.restart(0, run=2)
    assert reborn.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 2.0) == []
    assert cluster.commit(2.1) == [[], []]
    assert reborn.counters["once_awaited"] == 1


def test_a_paused_broker_restored_from_a_snapshot_answers_from_the_log_and_sends_nothing(cluster: Cluster) -> None:
    """The issue's schedule in small: b1 holds c1 waiting for its claim and is paused; the
    client fails over to b2, which claims, runs and commits c1; b1 resumes and catches up
    from a snapshot (which carries no effects). b1 answers its copy from the committed
    outcome, and its own claim, proposed again, does not send c1 a second time."""
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    b1.take_proposals(1.0)  # forwarded to a leader that is lost with the pause
    b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 2.0)
    (dispatch,) = [f for _, _, f in to_nodes(cluster.commit(2.0, paused=frozenset({0}))[1])]
    b2.node_message(NODE_A, reply(dispatch, "done"), 2.1)
    assert [payload_of(f) for _, _, f in cluster.commit(2.2, paused=frozenset({0}))[1]] == ["done"]
    cluster.states[0].restore(cluster.states[1].snapshot())
    out = b1.apply_shared(30.0)
    assert to_nodes(out) == [] and [payload_of(f) for _, _, f in to_clients(out)] == ["done"]
    assert cluster.commit(31.0) == [[], []] and b1.counters["once_dispatched"] == 0


def test_a_claim_of_its_own_found_in_a_snapshot_is_sent_once(cluster: Cluster) -> None:
    """b1's claim committed while b1 was paused (b2 waits on it without sending); b1 resumes
    through a snapshot: being the claimant run and never having sent it, b1 sends it, once."""
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    cluster.log.extend(b1.take_proposals(1.0))  # b1's claim reached the leader before the pause
    assert b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 2.0) == []  # no claim yet
    cluster.commit(2.0, paused=frozenset({0}))
    b2.take_proposals(2.0)
    cluster.states[0].restore(cluster.states[1].snapshot())
    sent = to_nodes(b1.apply_shared(30.0))
    assert len(sent) == 1 and to_nodes(cluster.commit(31.0)[1]) == []
    b1.node_message(NODE_A, reply(sent[0][2], "done"), 31.1)
    assert [len(to_clients(out)) for out in cluster.commit(31.2)] == [1, 1]


def test_a_claim_committed_after_its_broker_restarted_is_void(cluster: Cluster) -> None:
    """b1 proposes a claim and dies; its next run's `run` entry commits before the claim:
    the claim is void on every broker (that run never sent c1), so b2's claim wins and runs it."""
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    stale = b1.take_proposals(1.0)
    reborn = cluster.restart(0, run=2)
    cluster.commit(1.5)  # the new run's entry
    cluster.log.extend(stale)  # the dead run's claim, late
    b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 2.0)
    out = cluster.commit(2.0)
    assert len(to_nodes(out[1])) == 1 and to_nodes(out[0]) == []
    assert all(s.void_claims == 1 for s in cluster.states) and reborn.once is not None


def test_racing_claims_agree_on_the_first(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    cluster.register(NODE_B, "inst-b")
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 1.0)
    out1, out2 = cluster.commit()
    targets = {ident for _, ident, _ in to_nodes(out1 + out2)}
    assert len(targets) == 1
    assert cluster.states[0].claims == cluster.states[1].claims


def test_a_lost_proposal_is_proposed_again(cluster: Cluster) -> None:
    b1, _ = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    assert cluster.commit(1.0, drop=True) == [[], []]  # the leader changed: the claim is lost
    assert cluster.commit(1.5) == [[], []]  # not yet due again
    assert len(to_nodes(cluster.commit(2.1)[0])) == 1


def test_a_claimed_node_that_is_gone_is_node_lost_and_nobody_else_runs_it(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    cluster.commit()
    cluster.register(NODE_B, "inst-b")
    out = b1.undeliverable(Side.NODE, NODE_A, [b"x"], 2.0)
    b2.undeliverable(Side.NODE, NODE_A, [b"x"], 2.0)
    err = error_of(only(to_clients(out))[2])
    assert err.code == ErrorCode.NODE_LOST and err.details["exactly_once"] is True
    assert to_nodes(out) == []
    again = b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 3.0)
    assert to_nodes(again) == [] and error_of(only(again)[2]).code == ErrorCode.NODE_LOST


def test_a_handler_error_is_committed_but_a_capacity_refusal_is_not(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    (_, _, d1), = cluster.commit()[0]
    out = b1.node_message(NODE_A, error_reply(d1, ResourceExhaustedError("busy")), 1.1)
    assert error_of(only(out)[2]).code == ErrorCode.RESOURCE_EXHAUSTED
    assert cluster.commit(1.2) == [[], []] and not cluster.states[0].outcomes
    # The client retries: the claim stands, and the node proved it never started c1, so
    # the claimant sends it to the same node again.
    (_, ident, d2), = b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 2.0)
    assert ident == NODE_A
    b1.node_message(NODE_A, error_reply(d2, ValidationFailedError("no such card")), 2.1)
    out1, _ = cluster.commit(2.2)
    assert error_of(only(out1)[2]).code == ErrorCode.VALIDATION_FAILED
    replay = b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 3.0)
    assert error_of(only(replay)[2]).code == ErrorCode.VALIDATION_FAILED


def test_same_id_from_another_subject_is_another_command() -> None:

    assert once_key("c1", "pay", "charge", "alice") != once_key("c1", "pay", "charge", "bob")
    assert once_key("c1", "pay", "charge", None) == once_key("c1", "pay", "charge", "")


def test_deadline_answers_the_client_and_a_late_outcome_still_commits(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    frames = command_frames("pay", "charge", id="c1", deadline=5.0)
    b1.client_message(CLIENT, frames, 1.0)
    (_, _, d), = cluster.commit()[0]
    expired = b1.tick(6.0)
    assert error_of(only(to_clients(expired))[2]).code == ErrorCode.DEADLINE_EXCEEDED
    b1.node_message(NODE_A, reply(d, "late"), 7.0)
    assert cluster.commit(7.1) == [[], []]
    replay = b2.client_message(CLIENT_B, command_frames("pay", "charge", id="c1"), 8.0)
    assert payload_of(only(replay)[2]) == "late"


def test_without_a_cluster_the_action_takes_the_plain_path() -> None:
    broker = Broker(BrokerConfig(name="solo"))
    payload: dict[str, Any] = {**registration(ONCE, name="a"), "instance": "inst-a"}
    broker.node_message(NODE_A, node_system("register", payload), 0.0)
    assert to_nodes(broker.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0))
    assert broker.take_proposals(1.0) == [] and broker.apply_shared(1.0) == []


def test_a_revocation_is_proposed_until_committed_and_reaches_every_broker(cluster: Cluster) -> None:
    b1, _ = cluster.brokers
    assert b1.once is not None
    b1.once.propose_revoke("jti-1", 2e9, 1.0)
    cluster.commit(1.0, drop=True)  # lost on the way
    cluster.commit(2.1)  # proposed again, committed
    assert all(state.revoked == {"jti-1": 2e9} for state in cluster.states)
    assert b1.take_proposals(5.0) == []  # confirmed: not proposed again


def test_a_new_leader_gets_what_is_unconfirmed_at_once(cluster: Cluster) -> None:
    b1, _ = cluster.brokers
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    cluster.commit(1.0, drop=True)  # forwarded to a leader that died
    b1.leader_changed()
    assert len(to_nodes(cluster.commit(1.1)[0])) == 1  # not RETRY_S later


def test_a_node_of_another_key_cannot_take_a_process_id() -> None:
    """Invariant: exactly-once commands and their replies follow a node process id
    (`instance`), so only a node of the key that registered it may register it again (a
    reconnect); another admitted node claiming it is refused ACCESS_DENIED and its forged
    reply is not taken as an outcome."""
    from mesh.security.gate import Peer

    cluster = Cluster()
    b1, _ = cluster.brokers
    payload = {**registration(ONCE, capacity=2, name="pay"), "instance": "inst-a"}
    b1.node_message(NODE_A, node_system("register", payload), 0.0, Peer("pay"))
    out = b1.node_message(NODE_B, node_system("register", payload), 0.1, Peer("intruder"))
    err = error_of(only(out)[2][1:])
    assert err.code == ErrorCode.ACCESS_DENIED and err.details == {"field": "instance"}
    b1.client_message(CLIENT, command_frames("pay", "charge", id="c1"), 1.0)
    (_, sent_to, dispatch), = to_nodes(cluster.commit(1.0)[0])
    assert sent_to == NODE_A
    assert b1.node_message(NODE_B, reply(dispatch, "forged"), 1.1) == []
    assert cluster.commit(1.2) == [[], []] and not cluster.states[0].outcomes
    again = b1.node_message(b"node-a-reconnected", node_system("register", payload), 1.3, Peer("pay"))
    assert header_of(again[0][2][1:]).type.value == "response"  # the same key, a new link: accepted


def test_unconfirmed_records_are_proposed_again_once_due_and_in_the_order_they_fell_due() -> None:
    """A record whose effect has not arrived is proposed again RETRY_S after it was last
    proposed, and not before; confirmed ones never are (the table looks only at what is due)."""
    from mesh.broker.once import RETRY_S, OnceTable
    from mesh.cluster.shared import SharedState

    table = OnceTable("b1", 1, SharedState())
    table.propose_claim("k1", "node-1", 0.0)
    table.propose_claim("k2", "node-1", 0.5)
    table.propose_claim("k3", "node-1", 0.6)
    first = table.take_proposals(0.6)
    assert len(first) == 3 and table.take_proposals(RETRY_S) == [first[0]]
    table.confirmed("k2", outcome=False)
    assert table.take_proposals(RETRY_S + 0.55) == []
    assert table.take_proposals(RETRY_S + 0.6) == [first[2]]
    assert table.take_proposals(2 * RETRY_S) == [first[0]]
    table.propose_again()
    assert table.take_proposals(2 * RETRY_S) == [first[2], first[0]]
