"""Log replication in the consensus core: proposals, the consistency check, fast back-off, commit rules, learners."""

from __future__ import annotations

import random

import pytest

from mesh.cluster import (
    AppendRequest,
    AppendResponse,
    Config,
    Entry,
    HardState,
    PersistedState,
    RaftNode,
    Ready,
    Role,
    VoteRequest,
)
from mesh.protocol import ErrorCode, NotLeaderError
from mesh.testing.raft import Cluster


def test_a_proposal_on_the_leader_commits_and_is_applied_everywhere() -> None:
    """Data proposed on the leader reaches every node's committed entries, in order."""
    cluster = Cluster(learners=("l",))
    leader = cluster.elect("a")
    indexes = [leader.propose(b"one"), leader.propose(b"two")]
    cluster.settle()
    cluster.tick_all()  # the next heartbeat carries the new commit index to the followers
    assert indexes == [2, 3]  # index 1 is the leader's noop
    for name in cluster.nodes:
        assert cluster.applied_data(name) == [b"one", b"two"], name
        assert cluster.nodes[name].commit_index == 3


def test_a_proposal_on_a_follower_is_refused_with_a_leader_hint() -> None:
    """propose() on a follower raises NotLeaderError whose details name the leader."""
    cluster = Cluster()
    cluster.elect("a")
    with pytest.raises(NotLeaderError) as info:
        cluster.nodes["b"].propose(b"x")
    assert info.value.details == {"leader": "a"}
    assert info.value.code == ErrorCode.NOT_LEADER and info.value.retryable


def test_before_any_election_the_leader_hint_is_none() -> None:
    """A node that knows no leader says so in its refusal."""
    with pytest.raises(NotLeaderError) as info:
        Cluster().nodes["a"].propose(b"x")
    assert info.value.details == {"leader": None}


def test_ready_lists_what_to_persist_and_advance_clears_it() -> None:
    """A proposal shows up as an entry to persist and messages to send; advance() empties Ready."""
    cluster = Cluster()
    leader = cluster.elect("a")
    leader.propose(b"x")
    rd = leader.ready()
    assert rd.entries == (Entry(2, 1, b"x"),)
    assert {m.to for m in rd.messages} == {"b", "c"}
    assert all(isinstance(m, AppendRequest) and m.entries[-1].data == b"x" for m in rd.messages)
    leader.advance(rd)
    assert not leader.has_ready() and leader.ready() == Ready() and not Ready()


def test_a_vote_is_in_the_hard_state_of_the_ready_that_sends_it() -> None:
    """The vote to persist travels in the same Ready as the granting answer."""
    cluster = Cluster()
    b = cluster.nodes["b"]
    b.step(VoteRequest("b", "a", 1, 0, 0, False))
    rd = b.ready()
    assert rd.hard_state == HardState(term=1, vote="a", commit=0)
    assert rd.messages[0].granted


def test_the_leader_counts_its_own_entry_only_once_persisted() -> None:
    """With followers unreachable the leader's entry is uncommitted; a single voter commits after advance()."""
    cluster = Cluster(voters=("a",))
    leader = cluster.elect("a")
    index = leader.propose(b"x")
    assert leader.commit_index < index
    cluster.handle_ready("a")
    assert leader.commit_index == index


def test_a_minority_of_acknowledgements_does_not_commit() -> None:
    """In a five-node cluster the leader plus one follower is not a quorum."""
    cluster = Cluster(voters=("a", "b", "c", "d", "e"))
    leader = cluster.elect("a")
    for name in ("c", "d", "e"):
        cluster.isolate(name)
    index = leader.propose(b"x")
    cluster.settle()
    assert leader.commit_index < index
    cluster.heal()
    cluster.tick_all()
    assert leader.commit_index == index


def test_learners_replicate_but_do_not_count_for_the_quorum() -> None:
    """Leader plus learner is not a majority of three voters; the learner still gets the entry."""
    cluster = Cluster(learners=("l",))
    leader = cluster.elect("a")
    cluster.isolate("b")
    cluster.cut.add(frozenset(("a", "c")))
    cluster.cut.discard(frozenset(("a", "l")))
    index = leader.propose(b"x")
    cluster.settle()
    assert cluster.nodes["l"].log.last_index == index
    assert leader.match_index()["l"] == index
    assert leader.commit_index < index


def test_the_leader_exposes_each_peers_match_index_and_lag() -> None:
    """match_index() and status() give what the monitor shows: role, term, commit and each peer's lag."""
    cluster = Cluster()
    leader = cluster.elect("a")
    cluster.isolate("c")
    leader.propose(b"x")
    cluster.settle()
    assert leader.match_index() == {"b": 2, "c": 1}
    status = leader.status()
    assert (status["role"], status["term"], status["commit_index"], status["leader"]) == ("leader", 1, 2, "a")
    assert status["peers"] == {"b": {"match_index": 2, "lag": 0}, "c": {"match_index": 1, "lag": 1}}
    assert cluster.nodes["b"].match_index() == {}


def test_a_lagging_follower_gets_entries_in_messages_of_bounded_size() -> None:
    """A catch-up batch stops at max_bytes_per_message; an entry larger than that still goes, alone."""
    cluster = Cluster(max_bytes_per_message=100)
    leader = cluster.elect("a")
    cluster.isolate("c")
    sizes = [60, 30, 250, 40, 40, 40, 10]
    for n, size in enumerate(sizes):
        leader.propose(bytes([n]) * size)
    cluster.settle()
    cluster.heal()
    cluster.sent.clear()
    cluster.tick_all(3)
    assert cluster.applied_data("c") == [bytes([n]) * size for n, size in enumerate(sizes)]
    batches = [[len(e.data) for e in m.entries] for m in cluster.sent if isinstance(m, AppendRequest) and m.to == "c"]
    assert [b for b in batches if b] == [[60, 30], [250], [40, 40], [40, 10]]


def _follower(entries: tuple[Entry, ...], term: int) -> RaftNode:
    return RaftNode(Config("b", ("a", "b", "c")), random.Random(1), PersistedState(HardState(term), entries=entries))


def test_an_append_that_does_not_match_the_previous_entry_is_rejected_with_a_hint() -> None:
    """The consistency check fails; the answer names the follower's conflicting term and its first index."""
    b = _follower((Entry(1, 1), Entry(2, 2), Entry(3, 2), Entry(4, 2)), term=2)
    b.step(AppendRequest("b", "a", 3, 4, 3, (), 0))
    (answer,) = b.ready().messages
    assert answer == AppendResponse("a", "b", 3, False, 0, 4, 2, 2)


def test_an_append_past_the_end_of_the_log_is_rejected_with_the_next_index() -> None:
    """A follower missing entries answers with its last index + 1 and no term."""
    b = _follower((Entry(1, 1),), term=1)
    b.step(AppendRequest("b", "a", 1, 5, 1, (), 0))
    (answer,) = b.ready().messages
    assert (answer.success, answer.reject_index, answer.conflict_index, answer.conflict_term) == (False, 5, 2, 0)


def test_a_conflicting_suffix_is_replaced_and_persisted_again() -> None:
    """Entries after the first conflict are dropped; Ready asks to persist the leader's ones."""
    b = _follower((Entry(1, 1), Entry(2, 1), Entry(3, 1)), term=1)
    new = (Entry(2, 2, b"n2"), Entry(3, 2, b"n3"))
    b.step(AppendRequest("b", "a", 2, 1, 1, new, 3))
    rd = b.ready()
    assert rd.entries == new
    assert [e.term for e in b.log.entries] == [1, 2, 2]
    assert rd.committed_entries == (Entry(1, 1), *new)
    assert rd.messages == (AppendResponse("a", "b", 2, True, 3, 0, 0, 0),)


def test_a_duplicate_append_changes_nothing() -> None:
    """Entries the follower already holds are not rewritten (nothing new to persist)."""
    b = _follower((Entry(1, 1), Entry(2, 1)), term=1)
    b.step(AppendRequest("b", "a", 1, 0, 0, (Entry(1, 1), Entry(2, 1)), 0))
    assert b.ready().entries == ()


def test_the_follower_commit_never_passes_what_the_append_proved() -> None:
    """A heartbeat's commit index is capped at the last entry the consistency check covered."""
    b = _follower((Entry(1, 1), Entry(2, 1), Entry(3, 1)), term=1)
    b.step(AppendRequest("b", "a", 1, 1, 1, (), 3))
    assert b.commit_index == 1


def test_fast_back_off_skips_a_whole_conflicting_term_in_one_round_trip() -> None:
    """A follower with twenty entries of a stale term is repaired after two rejections, not twenty."""
    leaders_log = (Entry(1, 1), *(Entry(i, 3, b"new") for i in range(2, 31)))
    stale_log = (Entry(1, 1), *(Entry(i, 2, b"stale") for i in range(2, 22)))
    cluster = Cluster()
    cluster.disks.update(
        a=PersistedState(HardState(3, commit=1), entries=leaders_log),
        b=PersistedState(HardState(3, commit=1), entries=leaders_log),
        c=PersistedState(HardState(2, commit=1), entries=stale_log),
    )
    for name in cluster.nodes:
        cluster.restart(name)
    cluster.elect("a")
    rejections = [m for m in cluster.sent if isinstance(m, AppendResponse) and not m.success]
    assert [(m.reject_index, m.conflict_index, m.conflict_term) for m in rejections] == [(30, 22, 0), (21, 2, 2)]
    assert cluster.nodes["c"].log.entries == cluster.nodes["a"].log.entries


def test_entries_of_an_earlier_term_commit_only_with_one_of_the_current_term() -> None:
    """Raft 5.4.2: a new leader does not commit an old-term entry by counting replicas alone."""
    cluster = Cluster()
    old = cluster.elect("a")
    cluster.isolate("c")
    cluster.cut.add(frozenset(("a", "b")))
    old.propose(b"old")  # index 2, term 1, only on a
    cluster.settle()
    cluster.heal()
    # a restarts and wins term 2; its old entry now sits on a and (after replication) on b.
    cluster.restart("a")
    cluster.restart("b")
    cluster.restart("c")
    new = cluster.nodes["a"]
    while new.role is Role.FOLLOWER:
        new.tick()
    # Elect a and replicate to b, but drop every acknowledgement: a sees no quorum.
    cluster.settle(drop=lambda m: isinstance(m, AppendResponse) and m.success)
    assert (new.role, new.term, new.commit_index) == (Role.LEADER, 2, 1)
    assert cluster.nodes["b"].log.term(2) == 1
    new.step(AppendResponse("a", "b", 2, True, 2, 0, 0, 0))  # b holds the old entry: so does a quorum
    assert new.commit_index == 1
    new.step(AppendResponse("a", "b", 2, True, 3, 0, 0, 0))  # and the term-2 noop after it
    assert new.commit_index == 3


def test_proposals_between_two_readies_go_in_one_append_per_follower() -> None:
    """Group commit: records proposed between two Readies reach each follower in one
    AppendRequest (not one per record) and are persisted in one Ready; one
    acknowledgement per follower commits them all, and one more append per follower
    tells it the new commit index."""
    cluster = Cluster()
    leader = cluster.elect("a")
    cluster.sent.clear()
    indexes = [leader.propose(b"r%d" % n) for n in range(20)]
    rd = cluster.handle_ready("a")
    assert [e.index for e in rd.entries] == indexes
    appends = [m for m in rd.messages if isinstance(m, AppendRequest)]
    assert sorted(m.to for m in appends) == ["b", "c"]
    assert all([e.index for e in m.entries] == indexes for m in appends)
    cluster.settle()
    assert leader.commit_index == indexes[-1]
    assert all(cluster.applied_data(n)[-20:] == [b"r%d" % n for n in range(20)] for n in "abc")
    for follower in "bc":
        sent = [m for m in cluster.sent if isinstance(m, AppendRequest) and m.to == follower]
        assert [(len(m.entries), m.commit) for m in sent] == [(20, indexes[0] - 1), (0, indexes[-1])]
