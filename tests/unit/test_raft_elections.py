"""Leader election in the consensus core: pre-vote, one vote per term, the election restriction, check-quorum."""

from __future__ import annotations

import itertools
import random

import pytest

from mesh.cluster import (
    TRANSITIONS,
    AppendResponse,
    Config,
    Entry,
    HardState,
    PersistedState,
    RaftNode,
    Role,
    RoleEvent,
    VoteRequest,
    VoteResponse,
)
from mesh.protocol import InvalidStateError, ValidationFailedError
from mesh.testing.raft import Cluster

MISSING = [pair for pair in itertools.product(Role, RoleEvent) if pair not in TRANSITIONS]


def _node(name: str = "a", voters: tuple[str, ...] = ("a", "b", "c"), seed: int = 1) -> RaftNode:
    return RaftNode(Config(name, voters, election_ticks=10), random.Random(seed))


def test_a_single_voter_elects_itself_and_commits_its_noop() -> None:
    """A one-node cluster becomes leader on its first timeout and commits at once."""
    cluster = Cluster(voters=("a",))
    node = cluster.elect("a")
    cluster.settle()
    assert (node.role, node.term, node.leader, node.commit_index) == (Role.LEADER, 1, "a", 1)


def test_three_nodes_elect_exactly_one_leader_that_all_follow() -> None:
    """After one node times out, it leads term 1 and both others name it leader."""
    cluster = Cluster()
    cluster.elect("b")
    assert cluster.leaders() == ["b"]
    assert {n.leader for n in cluster.nodes.values()} == {"b"}
    assert {n.term for n in cluster.nodes.values()} == {1}


def test_the_election_timeout_is_random_in_its_range_and_seeded() -> None:
    """Nodes time out between election_ticks and twice that, the same way for the same seed."""
    def timeout(seed: int) -> int:
        node = _node(seed=seed)
        for ticks in itertools.count(1):
            node.tick()
            if node.role is Role.PRE_CANDIDATE:
                return ticks
        raise AssertionError  # pragma: no cover

    timeouts = [timeout(seed) for seed in range(40)]
    assert all(10 <= t < 20 for t in timeouts)
    assert len(set(timeouts)) > 3
    assert timeouts == [timeout(seed) for seed in range(40)]


def test_pre_vote_does_not_change_any_term() -> None:
    """A node that times out first asks for pre-votes at term+1 without bumping its own term."""
    node = _node()
    while node.role is not Role.PRE_CANDIDATE:
        node.tick()
    requests = node.ready().messages
    assert node.term == 0
    votes = {(m.to, m.term, m.pre_vote) for m in requests if isinstance(m, VoteRequest)}
    assert votes == {("b", 1, True), ("c", 1, True)}


def test_an_isolated_node_cannot_disrupt_the_leader_when_it_returns() -> None:
    """A partitioned follower keeps failing pre-votes, so its term stays and the leader keeps leading."""
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolate("c")
    for _ in range(60):
        cluster.tick_all()
    assert cluster.nodes["c"].term == 1 and cluster.nodes["c"].role is not Role.LEADER
    cluster.heal()
    cluster.tick_all(3)
    assert cluster.leaders() == ["a"] and cluster.nodes["a"].term == 1
    assert cluster.nodes["c"].leader == "a"


def test_a_node_votes_once_per_term() -> None:
    """Having voted for b in term 5, a refuses c in the same term."""
    node = _node()
    node.step(VoteRequest("a", "b", 5, 0, 0, False))
    node.step(VoteRequest("a", "c", 5, 0, 0, False))
    answers = [m for m in node.ready().messages if isinstance(m, VoteResponse)]
    assert [(m.to, m.granted) for m in answers] == [("b", True), ("c", False)]
    assert node.vote == "b" and node.term == 5


def test_a_repeated_request_from_the_same_candidate_is_granted_again() -> None:
    """A duplicate RequestVote (lost answer) gets the same positive answer."""
    node = _node()
    node.step(VoteRequest("a", "b", 5, 0, 0, False))
    node.step(VoteRequest("a", "b", 5, 0, 0, False))
    assert [m.granted for m in node.ready().messages] == [True, True]


@pytest.mark.parametrize("last", [(1, 2), (3, 1), (2, 1)], ids=["shorter", "older-term", "same-index-older-term"])
def test_a_node_refuses_a_candidate_whose_log_is_behind(last: tuple[int, int]) -> None:
    """The election restriction: no vote for a log older than one's own (b's ends at index 2, term 2)."""
    log = (Entry(1, 1), Entry(2, 2))
    b = RaftNode(Config("b", ("a", "b", "c")), random.Random(1), PersistedState(HardState(2), entries=log))
    b.step(VoteRequest("b", "c", 9, *last, False))
    assert b.ready().messages == (VoteResponse("c", "b", 9, False, False),)
    b.step(VoteRequest("b", "a", 9, 2, 2, False))
    assert b.ready().messages[-1] == VoteResponse("a", "b", 9, True, False)


def test_a_higher_term_in_an_answer_makes_a_leader_step_down() -> None:
    """A leader that hears of a later term from a follower becomes a follower of that term."""
    cluster = Cluster()
    leader = cluster.elect("a")
    leader.step(AppendResponse("a", "c", 7, False, 0, 0, 0, 0))
    assert (leader.role, leader.term, leader.leader) == (Role.FOLLOWER, 7, None)


def test_a_leader_ignores_vote_requests_while_it_holds_its_lease() -> None:
    """Check-quorum leases: a live leader does not step down for a candidate of a later term."""
    cluster = Cluster()
    leader = cluster.elect("a")
    leader.step(VoteRequest("a", "c", 7, 99, 7, False))
    assert (leader.role, leader.term) == (Role.LEADER, 1)


def test_a_vote_request_within_the_leaders_lease_is_ignored() -> None:
    """A node that heard from its leader within the election timeout ignores a higher-term request."""
    cluster = Cluster()
    cluster.elect("a")
    b = cluster.nodes["b"]
    b.step(VoteRequest("b", "c", 7, 99, 7, False))
    assert b.term == 1 and not b.ready().messages


def test_a_leader_without_a_quorum_steps_down_after_an_election_timeout() -> None:
    """Check-quorum: cut off from both followers, the leader becomes a follower."""
    cluster = Cluster()
    leader = cluster.elect("a")
    cluster.isolate("a")
    for _ in range(20):
        cluster.tick("a")
        cluster.settle()
    assert leader.role is Role.FOLLOWER and leader.leader is None


def test_the_majority_side_of_a_partition_elects_a_new_leader() -> None:
    """With the leader isolated, b and c elect one of themselves in a later term."""
    cluster = Cluster()
    cluster.elect("a")
    cluster.isolate("a")
    for _ in range(40):
        cluster.tick_all()
    assert set(cluster.leaders()) & {"b", "c"}
    new = cluster.nodes[next(n for n in cluster.leaders() if n != "a")]
    assert new.term > 1


def test_a_learner_never_campaigns_and_is_never_asked_to_vote() -> None:
    """However long a learner waits it stays a learner; candidates ask voters only."""
    cluster = Cluster(learners=("l",))
    for _ in range(100):
        cluster.tick("l")
    assert cluster.nodes["l"].role is Role.LEARNER and not cluster.nodes["l"].has_ready()
    cluster.elect("a")
    assert not [m for m in cluster.sent if isinstance(m, VoteRequest) and m.to == "l"]
    assert cluster.nodes["l"].leader == "a"


def test_a_message_for_another_node_or_from_a_stranger_is_refused() -> None:
    """step() raises ValidationFailedError instead of acting on a misrouted message."""
    node = _node()
    with pytest.raises(ValidationFailedError):
        node.step(VoteRequest("b", "c", 1, 0, 0, False))
    with pytest.raises(ValidationFailedError):
        node.step(VoteRequest("a", "zed", 1, 0, 0, False))


TABLE_IDS = [f"{r.value}-{e.value}" for r, e in TRANSITIONS]


@pytest.mark.parametrize("pair, target", list(TRANSITIONS.items()), ids=TABLE_IDS)
def test_every_role_table_entry_is_reachable_through_transition(pair: tuple[Role, RoleEvent], target: Role) -> None:
    """_transition moves a node along each entry of the role table."""
    node = _node()
    node.role = pair[0]
    node._transition(pair[1])
    assert node.role is target


@pytest.mark.parametrize("pair", MISSING, ids=[f"{r.value}-{e.value}" for r, e in MISSING])
def test_every_pair_missing_from_the_role_table_is_invalid_state(pair: tuple[Role, RoleEvent]) -> None:
    """A (role, event) pair the table lacks raises InvalidStateError naming both."""
    node = _node()
    node.role = pair[0]
    with pytest.raises(InvalidStateError) as info:
        node._transition(pair[1])
    assert info.value.details["state"] == pair[0].value and info.value.details["event"] == pair[1].value


def test_config_refuses_a_node_outside_the_cluster_and_bad_timing() -> None:
    """Config checks membership and that heartbeats come more often than elections."""
    with pytest.raises(ValueError):
        Config("z", ("a", "b"))
    with pytest.raises(ValueError):
        Config("a", ("a", "a"))
    with pytest.raises(ValueError):
        Config("a", ("a",), election_ticks=2, heartbeat_ticks=2)
