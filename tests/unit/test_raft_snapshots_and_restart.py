"""Snapshots, log compaction, InstallSnapshot to lagging followers, and restarts from persisted state."""

from __future__ import annotations

import random

import pytest

from mesh.cluster import (
    AppendRequest,
    Config,
    Entry,
    HardState,
    PersistedState,
    RaftNode,
    Role,
    Snapshot,
    SnapshotRequest,
    VoteRequest,
    VoteResponse,
)
from mesh.testing.raft import Cluster


def _leader_with(cluster: Cluster, *data: bytes) -> RaftNode:
    leader = cluster.elect("a")
    for item in data:
        leader.propose(item)
    cluster.settle()
    cluster.tick_all()
    return leader


def test_compact_drops_applied_entries_behind_a_snapshot() -> None:
    """After compact(i) the log starts at i + 1 and the snapshot holds the term of entry i."""
    cluster = Cluster()
    leader = _leader_with(cluster, b"1", b"2", b"3")
    snap = leader.compact(3, b"state@3")
    assert snap == Snapshot(3, 1, b"state@3")
    assert leader.log.first_index == 4 and leader.log.term(2) is None and leader.log.last_index == 4


@pytest.mark.parametrize("index", [0, 5, 99], ids=["not-past-the-snapshot", "not-applied", "past-the-end"])
def test_compact_refuses_an_index_outside_snapshot_to_applied(index: int) -> None:
    """Only applied entries past the current snapshot can be compacted."""
    cluster = Cluster()
    leader = _leader_with(cluster, b"1", b"2", b"3")
    leader.propose(b"pending")  # index 5, not applied
    with pytest.raises(ValueError):
        leader.compact(index, b"s")


def _leader_compacted_past_c(cluster: Cluster) -> RaftNode:
    """Leader a has compacted up to 4 what the cut-off follower c never got (still cut off)."""
    leader = cluster.elect("a")
    cluster.isolate("c")
    for i in range(5):
        leader.propose(b"%d" % i)
    cluster.settle()
    cluster.tick_all()
    cluster.compact("a", 4, b"state@4")
    return leader


def test_a_follower_behind_the_compacted_log_gets_the_snapshot_and_catches_up() -> None:
    """InstallSnapshot: the lagging follower's Ready holds the snapshot, then the entries after it."""
    cluster = Cluster()
    leader = _leader_compacted_past_c(cluster)
    leader.propose(b"after")
    cluster.heal()
    cluster.tick_all(3)
    c = cluster.nodes["c"]
    assert [m for m in cluster.sent if isinstance(m, SnapshotRequest) and m.to == "c"]
    assert cluster.installed["c"] == [4]
    assert cluster.disks["c"].snapshot == Snapshot(4, 1, b"state@4")
    assert c.log.last_index == leader.log.last_index == 7 and c.commit_index == 7
    assert cluster.applied_data("c") == [b"3", b"4", b"after"]  # "0" to "2" came inside the snapshot


def test_a_lost_snapshot_is_sent_again_after_a_wait_not_at_every_heartbeat() -> None:
    """Heartbeats refused while a (large, slow) snapshot is on its way do not resend it."""
    cluster = Cluster()
    leader = _leader_compacted_past_c(cluster)
    cluster.heal()
    cluster.sent.clear()

    def snapshots() -> list[SnapshotRequest]:
        return [m for m in cluster.sent if isinstance(m, SnapshotRequest) and m.to == "c"]

    for _ in range(2 * 10 - 2):  # almost two election timeouts of heartbeats, the snapshot lost
        for node in cluster.nodes.values():
            node.tick()
        cluster.settle(drop=lambda m: isinstance(m, SnapshotRequest))
    assert len(snapshots()) == 1 and cluster.installed["c"] == []
    assert all(not m.entries for m in cluster.sent if isinstance(m, AppendRequest) and m.to == "c")
    cluster.tick_all(4)
    assert len(snapshots()) == 2 and cluster.installed["c"] == [4]
    assert cluster.nodes["c"].commit_index == leader.commit_index


def test_a_snapshot_the_follower_already_holds_only_moves_its_commit() -> None:
    """A snapshot whose last entry matches the follower's log keeps the log (nothing to install)."""
    b = RaftNode(Config("b", ("a", "b", "c")), random.Random(1),
                 PersistedState(HardState(1), entries=(Entry(1, 1), Entry(2, 1), Entry(3, 1))))
    b.step(SnapshotRequest("b", "a", 1, Snapshot(2, 1, b"s")))
    rd = b.ready()
    assert rd.snapshot is None and b.log.last_index == 3 and b.commit_index == 2
    assert rd.messages[0].match_index == 2


def test_an_old_snapshot_is_answered_with_the_commit_index() -> None:
    """A snapshot at or below the follower's commit changes nothing."""
    b = RaftNode(Config("b", ("a", "b", "c")), random.Random(1),
                 PersistedState(HardState(1, commit=3), entries=(Entry(1, 1), Entry(2, 1), Entry(3, 1))))
    b.step(SnapshotRequest("b", "a", 1, Snapshot(2, 1, b"s")))
    rd = b.ready()
    assert rd.snapshot is None and rd.messages[0].match_index == 3


def test_a_restarted_node_keeps_its_term_vote_and_log() -> None:
    """Hard state, snapshot and entries persisted before a crash come back; it re-applies committed entries."""
    cluster = Cluster()
    _leader_with(cluster, b"x", b"y")
    cluster.compact("b", 2, b"state@2")
    applied_before = cluster.applied_data("b")
    b = cluster.restart("b")
    assert (b.term, b.vote, b.commit_index, b.log.last_index) == (1, "a", 3, 3)
    assert b.role is Role.FOLLOWER and b.leader is None
    assert b.log.snapshot == Snapshot(2, 1, b"state@2")
    rd = cluster.handle_ready("b")
    assert [e.data for e in rd.committed_entries] == [b"y"]  # index 3; the rest is in the snapshot
    assert applied_before == [b"x", b"y"]


def test_a_restarted_node_does_not_vote_twice_in_a_term() -> None:
    """The persisted vote survives a crash, so a second candidate of the same term is refused."""
    cluster = Cluster()
    b = cluster.nodes["b"]
    b.step(VoteRequest("b", "a", 1, 0, 0, False))
    cluster.handle_ready("b")
    b = cluster.restart("b")
    b.step(VoteRequest("b", "c", 1, 0, 0, False))
    assert b.ready().messages == (VoteResponse("c", "b", 1, False, False),)


def test_what_was_never_persisted_is_forgotten_by_a_crash() -> None:
    """A proposal whose Ready was not handled is gone after a restart."""
    cluster = Cluster(voters=("a",))
    leader = cluster.elect("a")
    cluster.settle()
    leader.propose(b"unsaved")
    a = cluster.restart("a")
    assert a.log.last_index == 1 and a.term == 1


def test_a_restart_from_a_commit_past_the_log_is_refused() -> None:
    """Persisted state whose commit index lies beyond its log cannot be the state of a correct node."""
    with pytest.raises(ValueError):
        RaftNode(Config("a", ("a",)), random.Random(1), PersistedState(HardState(1, None, 5), entries=(Entry(1, 1),)))
