"""The consensus core: Raft as a state machine without I/O, shaped like etcd's raft.

Rules of this module:

* No sockets, files, clocks or global randomness. Time arrives as `tick()` calls, the
  randomised election timeout comes from the `random.Random` the caller passes in,
  messages arrive through `step()`.
* Everything the application must do is collected, never done: `ready()` returns a
  `Ready` and `advance(ready)` says it was done. The application handles a Ready in
  this order: (1) persist `snapshot`, `entries` (truncating a conflicting suffix) and
  `hard_state` atomically, (2) send `messages`, (3) install `snapshot` into the state
  machine, then apply `committed_entries` in order. Persisting before sending is what
  makes a vote or an acknowledgement survive a crash.
* A node changes role only through `RoleEvent`s looked up in `TRANSITIONS` (by
  `mesh.protocol.states.transition`, the lookup every table uses); a missing pair (a
  second leader in one term) is a safety violation and raises InvalidStateError.
* Pre-vote and check-quorum are always on: a node asks "would you vote for me?" before
  it bumps its term, a node that heard from a leader within the election timeout
  refuses, and a leader that has not heard from a quorum for an election timeout steps
  down. A partitioned node therefore cannot disrupt the cluster when it returns.
* A leader counts an entry of its own log towards the quorum only once the application
  persisted it, and commits only entries of its current term (Raft section 5.4.2);
  each new leader appends a NOOP entry so that earlier entries commit promptly.
* Learners receive the log but never vote, never campaign and never count in a quorum.
* A leader sends appends per Ready, not per event: proposals and commit advances only
  mark an append as due, and `ready()` sends each follower one AppendRequest carrying
  everything new (and the latest commit index). The application proposing many records
  between two Readies therefore costs one message per follower, not one per record,
  and replication stays pipelined: the next Ready's appends go out without waiting for
  the acknowledgements of the previous ones.
"""

from __future__ import annotations

import random

from ..protocol.errors import InvalidStateError, NotLeaderError, ValidationFailedError
from ..protocol.states import transition
from .log import RaftLog
from .messages import (
    AppendRequest,
    AppendResponse,
    Entry,
    EntryKind,
    HardState,
    Message,
    Snapshot,
    SnapshotRequest,
    VoteRequest,
    VoteResponse,
)
from .records import (
    TRANSITIONS,
    Config,
    PersistedState,
    Progress,
    Ready,
    Role,
    RoleEvent,
    Votes,
)

__all__ = [
    "Role",
    "RoleEvent",
    "TRANSITIONS",
    "Config",
    "PersistedState",
    "Ready",
    "Progress",
    "RaftNode",
]


class RaftNode:
    """One member of a Raft cluster, driven by `tick`, `step`, `propose` and `ready`.

    Args:
        config: cluster shape and timing.
        rng: the source of election-timeout jitter; seed it for reproducible runs.
        state: what the application persisted before a restart (None for a new node).
    """

    def __init__(self, config: Config, rng: random.Random, state: PersistedState | None = None) -> None:
        state = state or PersistedState()
        self.config = config
        self.id = config.id
        self._rng = rng
        self._voters = frozenset(config.voters)
        self._peers = tuple(m for m in (*config.voters, *config.learners) if m != config.id)
        self._quorum = len(self._voters) // 2 + 1
        self.log = RaftLog(state.snapshot, state.entries, state.hard_state.commit)
        if self.log.commit > self.log.last_index:
            raise ValueError("persisted commit index is past the persisted log")
        self.term = state.hard_state.term
        self.vote = state.hard_state.vote
        self.leader: str | None = None
        self.role = Role.FOLLOWER if self.id in self._voters else Role.LEARNER
        self.progress: dict[str, Progress] = {}
        self._persisted = HardState(self.term, self.vote, self.log.commit)
        self._messages: list[Message] = []
        self._append_due = False  # entries proposed since the last Ready: every peer gets them
        self._commit_due = False  # the commit index advanced: replicating peers learn it
        self._pending_snapshot: Snapshot | None = None
        self._votes = Votes()
        self._ticks = 0  # ticks since start: when each follower's snapshot was sent
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._random_timeout()

    # ----------------------------------------------------------------- public API

    @property
    def commit_index(self) -> int:
        return self.log.commit

    @property
    def is_learner(self) -> bool:
        return self.id not in self._voters

    def match_index(self) -> dict[str, int]:
        """On a leader, each peer's last index known to match its log (else empty)."""
        return {peer: p.match_index for peer, p in self.progress.items() if peer != self.id}

    def status(self) -> dict[str, object]:
        """A JSON-friendly picture for the monitor: role, term, commit and each peer's lag."""
        return {
            "id": self.id,
            "role": self.role.value,
            "term": self.term,
            "leader": self.leader,
            "commit_index": self.log.commit,
            "applied_index": self.log.applied,
            "last_index": self.log.last_index,
            "peers": {
                peer: {"match_index": p.match_index, "lag": self.log.last_index - p.match_index}
                for peer, p in self.progress.items()
                if peer != self.id
            },
        }

    def tick(self) -> None:
        """One unit of logical time: heartbeats on a leader, election timeouts elsewhere."""
        self._ticks += 1
        self._election_elapsed += 1
        if self.role is Role.LEADER:
            self._heartbeat_elapsed += 1
            if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
                self._heartbeat_elapsed = 0
                self._broadcast_append()
            if self._election_elapsed >= self.config.election_ticks:
                self._election_elapsed = 0
                self._check_quorum()
        elif self.role is not Role.LEARNER and self._election_elapsed >= self._timeout:
            self._pre_campaign()

    def propose(self, data: bytes) -> int:
        """Append `data` to the replicated log; returns the index it will have.

        The entry is committed once `committed_entries` of some Ready holds it; it may
        still be lost if leadership changes first (the caller learns by its index).

        Raises:
            NotLeaderError: this node is not the leader; `details["leader"]` is the
                leader it knows of, or None.
        """
        if self.role is not Role.LEADER:
            raise NotLeaderError(f"{self.id} is not the cluster leader", details={"leader": self.leader})
        index = self.log.last_index + 1
        self.log.append([Entry(index, self.term, bytes(data))])
        self._append_due = bool(self._peers)  # sent by the next ready(), with whatever follows
        return index

    def step(self, msg: Message) -> None:
        """Take one message from a peer.

        Raises:
            ValidationFailedError: the message is not for this node or is from a stranger.
            InvalidStateError: the message breaks a safety invariant (a second leader in
                this leader's term, or an append that would overwrite a committed entry);
                only a bug in a peer can cause it.
        """
        if msg.to != self.id or msg.frm not in self._peers:
            raise ValidationFailedError(
                f"cluster message from {msg.frm!r} to {msg.to!r} reached {self.id!r}", details={"field": "to"}
            )
        if msg.term > self.term:
            if isinstance(msg, VoteRequest) and self._in_lease():
                return  # a leader is alive: do not let a rejoining node disrupt it
            if isinstance(msg, VoteRequest) and msg.pre_vote:
                pass  # a pre-vote never changes anyone's term
            elif isinstance(msg, VoteResponse) and msg.pre_vote and msg.granted:
                pass  # granted pre-votes carry the term the pre-candidate will use
            else:
                leader = msg.frm if isinstance(msg, (AppendRequest, SnapshotRequest)) else None
                self._become_follower(msg.term, leader, RoleEvent.NEWER_TERM)
        elif msg.term < self.term:
            self._answer_stale(msg)
            return
        if isinstance(msg, VoteRequest):
            self._on_vote_request(msg)
        elif isinstance(msg, VoteResponse):
            self._on_vote_response(msg)
        elif isinstance(msg, AppendRequest):
            self._leader_seen(msg.frm)
            self._on_append(msg)
        elif isinstance(msg, SnapshotRequest):
            self._leader_seen(msg.frm)
            self._on_snapshot(msg)
        elif isinstance(msg, AppendResponse):
            self._on_append_response(msg)

    def has_ready(self) -> bool:
        """Whether `ready()` would return something to do."""
        return bool(
            self._messages
            or self._append_due
            or self._commit_due
            or self.log.stable < self.log.last_index
            or self._pending_snapshot
            or self._hard_state() != self._persisted
            or self.log.applied < self.log.commit
        )

    def ready(self) -> Ready:
        """Everything the application must persist, send and apply now (see the module rules)."""
        self._send_due_appends()
        hard = self._hard_state()
        return Ready(
            messages=tuple(self._messages),
            entries=tuple(self.log.unstable()),
            hard_state=hard if hard != self._persisted else None,
            snapshot=self._pending_snapshot,
            committed_entries=tuple(self.log.slice(self.log.applied + 1, self.log.commit)),
        )

    def advance(self, rd: Ready) -> None:
        """Record that the application handled `rd` (persisted, sent and applied it)."""
        del self._messages[: len(rd.messages)]
        if rd.hard_state is not None:
            self._persisted = rd.hard_state
        if rd.snapshot is not None and rd.snapshot is self._pending_snapshot:
            self._pending_snapshot = None
        if rd.entries:
            last = rd.entries[-1]
            if self.log.term(last.index) == last.term:  # not overwritten since ready()
                self.log.stable = max(self.log.stable, last.index)
        if rd.committed_entries:
            self.log.applied = max(self.log.applied, rd.committed_entries[-1].index)
        if self.role is Role.LEADER:
            self.progress[self.id].match_index = self.log.stable
            self._maybe_commit()

    def compact(self, index: int, snapshot_data: bytes) -> Snapshot:
        """Discard the log up to `index`, which the application applied and snapshotted.

        The application persists the returned snapshot itself (storage.begin_snapshot);
        the node keeps it to send to followers that fall behind the compacted log.

        Raises:
            ValueError: `index` is not between the current snapshot and the applied index.
        """
        if not self.log.snapshot.index < index <= self.log.applied:
            raise ValueError(
                f"can compact only past the snapshot ({self.log.snapshot.index}) "
                f"up to the applied index ({self.log.applied}), not {index}"
            )
        return self.log.compact(index, snapshot_data)

    # ------------------------------------------------------------------- roles

    def _transition(self, event: RoleEvent) -> None:
        self.role = transition(TRANSITIONS, self.role, event, subject=self.id, term=self.term)

    def _become_follower(self, term: int, leader: str | None, event: RoleEvent) -> None:
        self._transition(event)
        if term != self.term:
            self.term, self.vote = term, None
        self.leader = leader
        self.progress = {}
        self._append_due = self._commit_due = False  # a follower sends no appends
        self._reset_timers()

    def _leader_seen(self, leader: str) -> None:
        if self.role not in (Role.FOLLOWER, Role.LEARNER) or self.leader != leader:
            self._transition(RoleEvent.LEADER_SEEN)
            self.leader = leader
        self._election_elapsed = 0

    def _pre_campaign(self) -> None:
        self._transition(RoleEvent.ELECTION_TIMEOUT)
        self.leader = None
        self._reset_timers()
        self._start_poll(self.term + 1, pre_vote=True)

    def _campaign(self) -> None:
        self._transition(RoleEvent.PRE_VOTE_WON)
        self.term += 1
        self.vote = self.id
        self._reset_timers()
        self._start_poll(self.term, pre_vote=False)

    def _become_leader(self) -> None:
        self._transition(RoleEvent.VOTE_WON)
        self.leader = self.id
        self._reset_timers()
        nxt = self.log.last_index + 1
        self.progress = {peer: Progress(nxt) for peer in self._peers}
        self.progress[self.id] = Progress(nxt, match_index=self.log.stable, probing=False, recently_active=True)
        self.log.append([Entry(nxt, self.term, b"", EntryKind.NOOP)])
        self._broadcast_append()

    def _start_poll(self, term: int, *, pre_vote: bool) -> None:
        self._votes = Votes(granted={self.id})
        for peer in self.config.voters:
            if peer != self.id:
                self._send(VoteRequest(peer, self.id, term, self.log.last_index, self.log.last_term, pre_vote))
        self._tally()

    def _tally(self) -> None:
        if len(self._votes.granted) >= self._quorum:
            if self.role is Role.PRE_CANDIDATE:
                self._campaign()
            else:
                self._become_leader()
        elif len(self._votes.refused) >= self._quorum:
            self._become_follower(self.term, None, RoleEvent.VOTE_LOST)

    def _check_quorum(self) -> None:
        active = sum(1 for peer, p in self.progress.items() if peer in self._voters and p.recently_active)
        for peer, p in self.progress.items():
            p.recently_active = peer == self.id
        if active < self._quorum:
            self._become_follower(self.term, None, RoleEvent.QUORUM_LOST)

    # ----------------------------------------------------------------- handlers

    def _may_vote_for(self, msg: VoteRequest) -> bool:
        """Raft's vote rule: one vote per term, and only for a log at least as new."""
        can_vote = (
            self.vote == msg.frm
            or (self.vote is None and self.leader is None)
            or (msg.pre_vote and msg.term > self.term)
        )
        return can_vote and self.log.is_up_to_date(msg.last_index, msg.last_term)

    def _on_vote_request(self, msg: VoteRequest) -> None:
        granted = not self.is_learner and self._may_vote_for(msg)
        if granted and not msg.pre_vote:
            self.vote = msg.frm
            self._election_elapsed = 0
        term = msg.term if granted else self.term
        self._send(VoteResponse(msg.frm, self.id, term, granted, msg.pre_vote))

    def _on_vote_response(self, msg: VoteResponse) -> None:
        polling = Role.PRE_CANDIDATE if msg.pre_vote else Role.CANDIDATE
        if self.role is not polling or msg.frm not in self._voters:
            return
        (self._votes.granted if msg.granted else self._votes.refused).add(msg.frm)
        self._tally()

    def _on_append(self, msg: AppendRequest) -> None:
        if msg.prev_index < self.log.commit:
            # Everything up to our commit matches any leader's log; tell it where we are.
            self._reply_append(msg.frm, True, self.log.commit)
            return
        if self.log.term(msg.prev_index) != msg.prev_term:
            if msg.prev_index > self.log.last_index:
                conflict_index, conflict_term = self.log.last_index + 1, 0
            else:
                conflict_index = self.log.first_index_of_term(msg.prev_index)
                conflict_term = self.log.term(msg.prev_index) or 0
            self._send(
                AppendResponse(msg.frm, self.id, self.term, False, 0, msg.prev_index, conflict_index, conflict_term)
            )
            return
        new = msg.entries[self.log.find_conflict(msg.entries) :]
        if new and new[0].index <= self.log.commit:
            raise InvalidStateError(
                f"leader {msg.frm} would overwrite committed entry {new[0].index}",
                details={"index": new[0].index, "commit": self.log.commit},
            )
        self.log.append(new)
        last_new = msg.prev_index + len(msg.entries)
        self.log.commit = max(self.log.commit, min(msg.commit, last_new))
        self._reply_append(msg.frm, True, last_new)

    def _on_snapshot(self, msg: SnapshotRequest) -> None:
        snap = msg.snapshot
        if snap.index <= self.log.commit:
            self._reply_append(msg.frm, True, self.log.commit)
            return
        if self.log.term(snap.index) == snap.term:
            # Our log already holds the snapshot's last entry: keep the log, commit up to it.
            self.log.commit = snap.index
        else:
            self.log.restore(snap)
            self._pending_snapshot = snap
        self._reply_append(msg.frm, True, snap.index)

    def _on_append_response(self, msg: AppendResponse) -> None:
        p = self.progress.get(msg.frm) if self.role is Role.LEADER else None
        if p is None:
            return
        p.recently_active = True
        if msg.success:
            if p.snapshot_index and msg.match_index >= p.snapshot_index:
                p.snapshot_index = 0  # installed
            if msg.match_index > p.match_index:
                p.match_index = msg.match_index
                p.next_index = max(p.next_index, msg.match_index + 1)
                p.probing = False
                self._maybe_commit()
                if p.next_index <= self.log.last_index:
                    self._send_append(msg.frm, p)
            return
        # A rejection is stale when it answers an older probe, or (while replicating)
        # concerns entries the follower has since acknowledged.
        if msg.reject_index <= p.match_index or p.probing and msg.reject_index != p.next_index - 1:
            return
        if self._snapshot_in_flight(p) and msg.reject_index <= p.snapshot_index:
            return  # a heartbeat that overtook the snapshot, or came before it was installed
        hint = msg.conflict_index
        if msg.conflict_term:
            found = self.log.last_index_of_term(msg.conflict_term, msg.reject_index)
            if found is not None:
                hint = found + 1
        p.probing = True
        p.next_index = max(p.match_index + 1, min(hint, msg.reject_index))
        self._send_append(msg.frm, p)

    def _answer_stale(self, msg: Message) -> None:
        """Tell a node from an older term about ours, so a deposed leader steps down."""
        if isinstance(msg, (AppendRequest, SnapshotRequest)):
            self._send(AppendResponse(msg.frm, self.id, self.term, False, 0, 0, 0, 0))
        elif isinstance(msg, VoteRequest) and msg.pre_vote:
            self._send(VoteResponse(msg.frm, self.id, self.term, False, True))

    # ---------------------------------------------------------------- replication

    def _maybe_commit(self) -> None:
        matches = sorted((p.match_index for peer, p in self.progress.items() if peer in self._voters), reverse=True)
        index = matches[self._quorum - 1]
        if index > self.log.commit and self._may_commit(index):
            self.log.commit = index
            # Tell the replicating followers with the next Ready rather than at the next
            # heartbeat (as etcd does): a broker waiting on a follower for a commit then
            # waits one round trip. A probed follower gets one append per answer or
            # heartbeat, as before.
            self._commit_due = bool(self._peers)

    def _may_commit(self, index: int) -> bool:
        """Raft's commit rule: a quorum holds it, and it is of the leader's own term."""
        return self.log.term(index) == self.term

    def _broadcast_append(self) -> None:
        for peer in self._peers:
            self._send_append(peer, self.progress[peer])

    def _send_due_appends(self) -> None:
        """One append per follower for everything proposed or committed since the last Ready.

        New entries go to every peer (a probed one gets its probe again, as on a
        heartbeat); a commit advance alone goes to the replicating peers that have not
        been sent this commit index yet.
        """
        append_due, commit_due = self._append_due, self._commit_due
        self._append_due = self._commit_due = False
        if append_due:
            self._broadcast_append()
        elif commit_due:
            for peer in self._peers:
                p = self.progress[peer]
                if not p.probing and p.commit_sent < self.log.commit:
                    self._send_append(peer, p)

    def _send_append(self, peer: str, p: Progress) -> None:
        """Send what follows `next_index`; when replicating, assume it arrives (as etcd does).

        A lost message shows up as the rejection of a later append or heartbeat; the
        leader then probes back from the follower's hint and sends again.
        """
        prev_index = p.next_index - 1
        prev_term = self.log.term(prev_index)
        if prev_term is None or p.next_index < self.log.first_index:
            # The follower needs compacted entries: send the snapshot, then probe after it.
            self._send(SnapshotRequest(peer, self.id, self.term, self.log.snapshot))
            p.next_index, p.probing = self.log.snapshot.index + 1, True
            p.snapshot_index, p.snapshot_at = self.log.snapshot.index, self._ticks
            return
        if self._snapshot_in_flight(p):
            self._send(AppendRequest(peer, self.id, self.term, prev_index, prev_term, (), self.log.commit))
            return
        last = min(self.log.last_index, prev_index + self.config.max_entries_per_message)
        entries = tuple(self.log.batch(p.next_index, last, self.config.max_bytes_per_message))
        last = prev_index + len(entries)
        self._send(AppendRequest(peer, self.id, self.term, prev_index, prev_term, entries, self.log.commit))
        p.commit_sent = self.log.commit
        if not p.probing:
            p.next_index = last + 1

    def _snapshot_in_flight(self, p: Progress) -> bool:
        """A snapshot was sent to this follower and may still arrive (within two election
        timeouts; after that the leader sends it again)."""
        return p.snapshot_index > 0 and self._ticks - p.snapshot_at < 2 * self.config.election_ticks

    def _reply_append(self, to: str, success: bool, match_index: int) -> None:
        self._send(AppendResponse(to, self.id, self.term, success, match_index, 0, 0, 0))

    # ------------------------------------------------------------------- helpers

    def _send(self, msg: Message) -> None:
        self._messages.append(msg)

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.commit)

    def _in_lease(self) -> bool:
        return self.leader is not None and self._election_elapsed < self.config.election_ticks

    def _random_timeout(self) -> int:
        return self.config.election_ticks + self._rng.randrange(self.config.election_ticks)

    def _reset_timers(self) -> None:
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
