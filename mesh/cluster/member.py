"""One broker's membership in the cluster: the thin driver between its loop and the core.

Rules of this module:

* `ClusterMember` owns a `RaftNode`, its `RaftStorage` (DATA/raft.sqlite3) and its
  `PeerTransport`; it holds no consensus logic of its own. The broker's poller loop
  registers `sockets` for POLLIN and, each turn, calls `on_readable` for a readable
  socket, `tick(now)` with the monotonic clock, and then `process()`.
* `process()` handles every Ready in the core's order: persist (one SQLite transaction,
  fsync'd, for everything the Ready holds: group commit), send, install a snapshot into
  the state machine, apply the committed NORMAL entries in order, advance. Then it
  compacts and sends the proposals that waited for a leader.
* Compaction: once the applied log runs `compact_after` entries past the last snapshot
  and its entries' bytes reach that snapshot's size, the state machine's state is
  captured here (copied) and packed and written to disk by the storage's own thread
  (RaftStorage rules); the loop goes on meanwhile, one snapshot is written at a time,
  and the in-memory log is compacted when it is on disk. The byte rule keeps the
  work per entry bounded however large the shared state grows, as a log-structured
  store compacts: a 20 MB state is snapshotted after 20 MB of log, not every 10,000 entries.
* One exception to "persist, then send", as etcd's raft allows a leader (Raft thesis
  10.2.1): appends and snapshots of a term already on disk leave before the Ready is
  persisted, so the leader's fsync and its followers' overlap. They promise nothing
  about this member's disk (the core counts the leader's own entries only once
  persisted); votes and acknowledgements, which do, still leave only after the fsync.
* `propose()` never blocks and never promises: the leader appends, a follower forwards
  to the leader it knows, and with no leader known the data waits in a small queue
  (`pending_limit`, `pending_timeout`) and is dropped (counted) when it fills or times
  out. The caller treats a proposal as possibly lost and retries by its own timeout;
  it learns the outcome when its state machine applies the entry.
* A forwarded proposal that reaches a member that no longer leads is dropped (counted),
  never forwarded again, so no proposal circles between members.
* Construction reads the data directory before opening any socket: a corrupted state
  raises `CorruptStateError` naming the file, and a good one restores the state
  machine from its snapshot and re-applies the committed entries after it.
* An exception from the state machine propagates: a replicated state machine cannot
  skip an entry, so the broker must stop rather than diverge.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

import zmq

from ..protocol.errors import InvalidStateError, MeshError, MessageTooLargeError
from .messages import AppendRequest, EntryKind, Message, SnapshotRequest
from .raft import Config, RaftNode, Ready, Role
from .storage import RaftStorage
from .transport import MAX_PROPOSAL_BYTES, PeerSecurity, PeerTransport, ProposalIn, RaftIn

__all__ = [
    "STATE_FILE",
    "TICK_S",
    "ELECTION_TICKS",
    "HEARTBEAT_TICKS",
    "COMPACT_AFTER",
    "COMPACT_AT_MOST",
    "StateMachine",
    "ClusterMember",
    "cluster_id_of",
]

STATE_FILE: Final = "raft.sqlite3"
TICK_S: Final = 0.05
ELECTION_TICKS: Final = 10  # an election starts 0.5-1 s after the leader falls silent
HEARTBEAT_TICKS: Final = 2  # the leader speaks every 0.1 s
COMPACT_AFTER: Final = 10_000
COMPACT_AT_MOST: Final = 10  # x compact_after: a snapshot then however small the entries (what a restart replays)
PENDING_LIMIT: Final = 256
PENDING_TIMEOUT_S: Final = 2.0
MAX_CATCH_UP_TICKS: Final = 2 * ELECTION_TICKS  # a stalled loop does not fire a burst of ticks

log = logging.getLogger("mesh.cluster")


class StateMachine(Protocol):
    """What the cluster replicates: the application applies committed data in order."""

    def apply(self, index: int, data: bytes) -> None:
        """Apply the committed entry at `index` (called once per index, in order)."""

    def capture(self) -> Callable[[], bytes]:
        """The whole state as it is now, after every entry applied so far, as a function
        that packs it into bytes, later and in another thread (the snapshot writer's)."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state by bytes that `capture()`'s function returned."""


def cluster_id_of(voters: Iterable[str]) -> str:
    """The cluster id stored with each member's state: its sorted voter ids."""
    return "mesh:" + ",".join(sorted(voters))


class ClusterMember:
    """A member of the broker cluster, driven by the broker's loop (see the module rules).

    Args:
        member_id: this broker's id in the cluster.
        members: member id -> peer endpoint (`tcp://host:port`), voters and learners,
            this member included.
        learners: the ids of `members` that receive the log but do not vote.
        data_dir: the directory of this member's durable state (created if missing).
        state_machine: what committed entries are applied to.
        ctx: the broker's ZeroMQ context (its ZAP handler serves CURVE peer links).
        security: CURVE on the peer links, or None for plain links.
        cluster_id: stored in the state file and checked on restart; by default
            `cluster_id_of(voters)`.
        tick_s: the length of one consensus tick in seconds.
        election_ticks: see `Config`; with `tick_s` it sets the failover time.
        heartbeat_ticks: see `Config`.
        seed: seeds the election jitter (None: from the OS).
        compact_after: applied entries past the last snapshot before a new snapshot.
        pending_limit: proposals held while no leader is known.
        pending_timeout: seconds a held proposal waits for a leader.

    Raises:
        CorruptStateError: the state file failed its checks (the message names it).
        ConfigurationError: a bad endpoint or key file, or a port in use.
        ValueError: an inconsistent membership.
    """

    def __init__(
        self,
        member_id: str,
        members: Mapping[str, str],
        learners: Iterable[str],
        data_dir: str | Path,
        state_machine: StateMachine,
        ctx: zmq.Context,
        *,
        security: PeerSecurity | None = None,
        cluster_id: str | None = None,
        tick_s: float = TICK_S,
        election_ticks: int = ELECTION_TICKS,
        heartbeat_ticks: int = HEARTBEAT_TICKS,
        seed: int | None = None,
        compact_after: int = COMPACT_AFTER,
        pending_limit: int = PENDING_LIMIT,
        pending_timeout: float = PENDING_TIMEOUT_S,
    ) -> None:
        learner_ids = frozenset(learners)
        if not learner_ids <= set(members):
            raise ValueError(f"learners {sorted(learner_ids - set(members))} are not members")
        voters = tuple(sorted(m for m in members if m not in learner_ids))
        config = Config(
            member_id, voters, tuple(sorted(learner_ids)),
            election_ticks=election_ticks, heartbeat_ticks=heartbeat_ticks,
        )  # fmt: skip
        self.id = member_id
        self.endpoints = dict(members)
        self.state_machine = state_machine
        self.tick_s = tick_s
        self.compact_after = compact_after
        self.pending_timeout = pending_timeout
        self.counters: Counter[str] = Counter()
        self._pending: deque[tuple[float, bytes]] = deque()
        self._pending_limit = pending_limit
        self._now: float | None = None
        self._next_tick: float | None = None
        self._closed = False
        self._heard: dict[str, float] = {}  # peer -> monotonic time of its last message
        self._applied_bytes = 0  # of the entries applied since the last snapshot was taken
        self._snapshot_bytes = 0  # the size of that snapshot

        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.storage = RaftStorage.open(directory / STATE_FILE, cluster_id or cluster_id_of(voters))
        try:
            state = self.storage.load()
            self._durable_term = state.hard_state.term  # the term on disk: its appends may leave early
            if state.snapshot.index:
                state_machine.restore(state.snapshot.data)
                self._snapshot_bytes = len(state.snapshot.data)
            self.raft = RaftNode(config, random.Random(seed), state)
            self.transport = PeerTransport(ctx, member_id, self.endpoints, security)
        except BaseException:
            self.storage.close()
            raise
        try:
            self.process()  # re-apply the committed entries after the snapshot
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ loop API

    @property
    def sockets(self) -> Sequence[zmq.Socket]:
        """The sockets to poll for POLLIN (then call `on_readable`)."""
        return (self.transport.router,)

    @property
    def is_leader(self) -> bool:
        return self.raft.role is Role.LEADER

    @property
    def leader(self) -> str | None:
        """The member this one believes leads (itself included), or None."""
        return self.raft.leader

    def on_readable(self, sock: zmq.Socket) -> None:
        """Take what waits on `sock` (up to a batch) without blocking; call `process()` after."""
        if sock is not self.transport.router:
            return
        heard = time.monotonic()
        for item in self.transport.receive():
            self._heard[item.frm] = heard
            if isinstance(item, RaftIn):
                self._step(item)
            else:
                self._forwarded(item)

    def tick(self, now: float) -> None:
        """Advance the core by the ticks elapsed up to `now` (a monotonic clock); call
        `process()` after. Also expires proposals that waited too long for a leader."""
        self._now = now
        if self._next_tick is None:
            self._next_tick = now + self.tick_s
        fired = 0
        while now >= self._next_tick:
            if fired == MAX_CATCH_UP_TICKS:
                self._next_tick = now + self.tick_s
                break
            self.raft.tick()
            fired += 1
            self._next_tick += self.tick_s
        while self._pending and self._pending[0][0] <= now:
            self._pending.popleft()
            self.counters["proposals_expired"] += 1

    def next_tick_in(self, now: float) -> float:
        """Seconds until the next tick is due: a bound for the loop's poll timeout."""
        return 0.0 if self._next_tick is None else max(0.0, self._next_tick - now)

    def propose(self, data: bytes) -> None:
        """Put `data` on its way into the replicated log (see the module rules: may be lost).

        Raises:
            MessageTooLargeError: over `MAX_PROPOSAL_BYTES`.
        """
        if len(data) > MAX_PROPOSAL_BYTES:
            raise MessageTooLargeError(
                f"cluster proposal of {len(data)} bytes is over the limit", details={"limit": MAX_PROPOSAL_BYTES}
            )
        if not self._pending and self._submit(bytes(data)):
            return  # (behind held proposals it waits its turn, to keep their order)
        if len(self._pending) >= self._pending_limit:
            self._pending.popleft()
            self.counters["proposals_dropped"] += 1
        now = self._now if self._now is not None else time.monotonic()
        self._pending.append((now + self.pending_timeout, bytes(data)))

    def process(self) -> None:
        """Handle every Ready of the core, compact if due, send held proposals."""
        raft = self.raft
        while raft.has_ready():
            rd = raft.ready()
            later: Sequence[Message] = rd.messages
            if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                held: list[Message] = []
                later = held
                for msg in rd.messages:
                    if isinstance(msg, (AppendRequest, SnapshotRequest)) and msg.term <= self._durable_term:
                        self.transport.send_message(msg)  # no promise about this disk: before the fsync
                    else:
                        held.append(msg)
                if self.storage.persist(rd):
                    self.counters["syncs"] += 1  # waited for the disk (not a mere commit index)
                if rd.hard_state is not None:
                    self._durable_term = rd.hard_state.term
                self.counters["persists"] += 1  # one transaction
                self.counters["entries_persisted"] += len(rd.entries)
            for msg in later:
                self.transport.send_message(msg)
            self._apply(rd)
            raft.advance(rd)
        self._maybe_compact()
        while self._pending and raft.leader is not None:
            _, data = self._pending[0]
            if not self._submit(data):
                break
            self._pending.popleft()

    def status(self) -> dict[str, object]:
        """A JSON-friendly picture for the monitor's /cluster page."""
        core = self.raft.status()
        now = time.monotonic()
        lags = core.pop("peers")
        assert isinstance(lags, dict)
        peers = {
            peer: {
                "endpoint": endpoint,
                "voter": peer in self.raft.config.voters,
                "match_index": lags.get(peer, {}).get("match_index"),
                "lag": lags.get(peer, {}).get("lag"),
                "silent_s": round(now - self._heard[peer], 3) if peer in self._heard else None,
            }
            for peer, endpoint in sorted(self.endpoints.items())
            if peer != self.id
        }
        return {
            **core,
            "snapshot_index": self.raft.log.snapshot.index,
            "pending_proposals": len(self._pending),
            "peers": peers,
            "counters": dict(self.counters + self.transport.counters),
        }

    def close(self) -> None:
        """Close the peer sockets (linger 0) and the state file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()
        self.storage.close()  # after a snapshot being written is on disk

    # ------------------------------------------------------------------ helpers

    def _step(self, item: RaftIn) -> None:
        try:
            self.raft.step(item.message)
        except InvalidStateError as exc:
            # Only a safety bug (here or in a peer) gets here: loud, but keep serving.
            self.counters["invalid_state"] += 1
            log.error("cluster: refused a message from %s: %s", item.frm, exc)
        except MeshError as exc:
            self.counters["refused_messages"] += 1
            log.warning("cluster: refused a message from %s: %s", item.frm, exc)

    def _forwarded(self, item: ProposalIn) -> None:
        if self.raft.role is Role.LEADER:
            self.raft.propose(item.data)
            self.counters["proposals_from_peers"] += 1
        else:
            self.counters["forwarded_not_leader"] += 1

    def _submit(self, data: bytes) -> bool:
        """Propose on the leader or forward to it; False when no leader is reachable."""
        leader = self.raft.leader
        if self.raft.role is Role.LEADER:
            self.raft.propose(data)
            return True
        if leader is not None and leader != self.id and self.transport.forward_proposal(leader, data):
            self.counters["proposals_forwarded"] += 1
            return True
        return False

    def _apply(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.state_machine.restore(rd.snapshot.data)
            self._applied_bytes, self._snapshot_bytes = 0, len(rd.snapshot.data)
            self.counters["snapshots_installed"] += 1
        apply = self.state_machine.apply
        self.counters["entries_applied"] += len(rd.committed_entries)
        for entry in rd.committed_entries:
            self._applied_bytes += len(entry.data)
            if entry.kind is EntryKind.NORMAL:
                apply(entry.index, entry.data)

    def _maybe_compact(self) -> None:
        storage = self.storage
        if storage.writing_snapshot:
            snap = storage.finish_snapshot()
            if snap is not None:
                self._snapshot_bytes = len(snap.data)
                if self.raft.log.snapshot.index < snap.index:  # else one from the leader overtook it
                    self.raft.compact(snap.index, snap.data)
                self.counters["compactions"] += 1
            return
        log_ = self.raft.log
        entries = log_.applied - log_.snapshot.index
        if entries <= self.compact_after:
            return
        if self._applied_bytes < self._snapshot_bytes and entries <= COMPACT_AT_MOST * self.compact_after:
            return
        index = log_.applied
        term = log_.term(index)
        assert term is not None  # applied entries past the snapshot are in the log
        self._applied_bytes = 0
        storage.begin_snapshot(index, term, self.state_machine.capture())
