"""The records the consensus core shares with its caller: roles and their table, settings,
the persisted state it starts from, each `Ready`, and the leader's view of a follower.

They are plain data (no behaviour beyond validating `Config`), split from `raft.py` so
that the state machine reads on its own; `mesh.cluster.raft` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from .messages import MAX_RAFT_MESSAGE_BYTES, Entry, HardState, Message, Snapshot

__all__ = ["Role", "RoleEvent", "TRANSITIONS", "Config", "PersistedState", "Ready", "Progress", "Votes"]


class Role(str, Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    LEARNER = "learner"


class RoleEvent(str, Enum):
    ELECTION_TIMEOUT = "election_timeout"  # no leader heard from for the randomised timeout
    PRE_VOTE_WON = "pre_vote_won"  # a quorum would vote: start the real election
    VOTE_WON = "vote_won"  # a quorum voted for this node in its term
    NEWER_TERM = "newer_term"  # a message of a later term arrived
    LEADER_SEEN = "leader_seen"  # the leader of the current term spoke
    QUORUM_LOST = "quorum_lost"  # a leader heard from no quorum for an election timeout
    VOTE_LOST = "vote_lost"  # a quorum refused (pre-)votes


R, E = Role, RoleEvent

TRANSITIONS: Final[dict[tuple[Role, RoleEvent], Role]] = {
    (R.FOLLOWER, E.ELECTION_TIMEOUT): R.PRE_CANDIDATE,
    (R.FOLLOWER, E.NEWER_TERM): R.FOLLOWER,
    (R.FOLLOWER, E.LEADER_SEEN): R.FOLLOWER,
    (R.PRE_CANDIDATE, E.ELECTION_TIMEOUT): R.PRE_CANDIDATE,
    (R.PRE_CANDIDATE, E.PRE_VOTE_WON): R.CANDIDATE,
    (R.PRE_CANDIDATE, E.VOTE_LOST): R.FOLLOWER,
    (R.PRE_CANDIDATE, E.NEWER_TERM): R.FOLLOWER,
    (R.PRE_CANDIDATE, E.LEADER_SEEN): R.FOLLOWER,
    (R.CANDIDATE, E.ELECTION_TIMEOUT): R.PRE_CANDIDATE,
    (R.CANDIDATE, E.VOTE_WON): R.LEADER,
    (R.CANDIDATE, E.VOTE_LOST): R.FOLLOWER,
    (R.CANDIDATE, E.NEWER_TERM): R.FOLLOWER,
    (R.CANDIDATE, E.LEADER_SEEN): R.FOLLOWER,
    (R.LEADER, E.NEWER_TERM): R.FOLLOWER,
    (R.LEADER, E.QUORUM_LOST): R.FOLLOWER,
    (R.LEARNER, E.NEWER_TERM): R.LEARNER,
    (R.LEARNER, E.LEADER_SEEN): R.LEARNER,
}

del R, E


@dataclass(frozen=True)
class Config:
    """The static shape of the cluster and the timing of one node.

    Args:
        id: this node's id.
        voters: ids of the voting members (this node among them unless it is a learner).
        learners: ids of non-voting members that only receive the log.
        election_ticks: a follower campaigns after a random timeout in
            [election_ticks, 2 * election_ticks) ticks without a leader.
        heartbeat_ticks: a leader sends heartbeats every this many ticks.
        max_entries_per_message: the most entries one AppendRequest carries.
        max_bytes_per_message: the most entry data one AppendRequest carries (it always
            carries at least one entry), so that a batch of large entries stays one message.
    """

    id: str
    voters: tuple[str, ...]
    learners: tuple[str, ...] = ()
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    max_entries_per_message: int = 64
    max_bytes_per_message: int = MAX_RAFT_MESSAGE_BYTES // 8  # + one entry of at most MAX_PROPOSAL_BYTES

    def __post_init__(self) -> None:
        members = (*self.voters, *self.learners)
        if len(set(members)) != len(members) or not self.voters:
            raise ValueError("voters must be non-empty and members unique")
        if self.id not in members:
            raise ValueError(f"node {self.id!r} is neither a voter nor a learner")
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        if self.max_entries_per_message < 1 or self.max_bytes_per_message < 1:
            raise ValueError("need at least one entry and one byte per message")


@dataclass(frozen=True)
class PersistedState:
    """What survives a restart: what earlier Readies asked the application to persist."""

    hard_state: HardState = HardState()
    snapshot: Snapshot = Snapshot()
    entries: tuple[Entry, ...] = ()


@dataclass(frozen=True)
class Ready:
    """What the application must do now (handle it in the order of the module rules)."""

    messages: tuple[Message, ...] = ()
    entries: tuple[Entry, ...] = ()
    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.messages or self.entries or self.hard_state or self.snapshot or self.committed_entries)


@dataclass
class Progress:
    """A leader's view of one follower: what it holds and what to send it next.

    While `probing` the leader does not know where the follower's log matches its own,
    so it sends from `next_index` without moving it until an answer arrives. Once an
    append succeeds it replicates optimistically: `next_index` moves past what was sent.
    While a snapshot is on its way (`snapshot_index`, sent at tick `snapshot_at`) the
    follower gets heartbeats only, and its refusals of them do not send the snapshot
    again: a large one takes a while to arrive.
    """

    next_index: int
    match_index: int = 0
    probing: bool = True
    recently_active: bool = False
    snapshot_index: int = 0
    snapshot_at: int = 0
    commit_sent: int = 0  # the commit index of the last append sent (a due commit skips it)


@dataclass
class Votes:
    granted: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
