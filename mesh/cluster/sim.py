"""A deterministic simulator that runs the consensus core under faults and checks safety.

Rules of this module:

* One seed decides everything: the cluster (3 or 5 voters, maybe a learner), the fault
  rates, and every choice of the run, all drawn from one `random.Random(seed)`. The same
  seed replays the same run, so a failing seed is a bug report:
  `python -m mesh.cluster.sim --start SEED --seeds 1`.
* The network loses, duplicates, delays and reorders messages, partitions (also one
  way: a link that loses everything in one direction) and heals; nodes crash and
  restart from their simulated disk. A node's Ready is handled (persist, send, apply)
  only at some steps, so a crash loses exactly what was never persisted.
* A tenth of the messages travel through `encode_message`/`decode_message`, so the
  codec sees real traffic; a refused message is a violation too.
* Safety is checked as the run goes: election safety after every step (at most one
  leader per term), log matching on every entry a node persists, leader completeness
  whenever a node becomes leader, state machine safety on every entry applied and every
  snapshot installed. The application is a hash chain over the applied entries, so two
  nodes that agree at an index agree on the whole history before it.
* Liveness, after the faults: the network heals, every node restarts, and within
  `SETTLE_TICKS` a leader must be elected and a new proposal applied on every voter.
* `Bug` injects a deliberately broken rule, to show that the checks catch it.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from ..protocol.errors import InvalidStateError, MeshError, NotLeaderError
from .messages import Entry, HardState, Message, Snapshot, VoteRequest, decode_message, encode_message
from .raft import Config, PersistedState, RaftNode, Ready, Role

__all__ = ["Bug", "Property", "Violation", "SimResult", "Summary", "Simulation", "run_seeds", "main"]

ELECTION_TICKS: Final = 6
SETTLE_TICKS: Final = 120
DEFAULT_STEPS: Final = 150
CODEC_SAMPLE: Final = 0.1  # the share of messages sent through encode_message/decode_message


class Bug(str, Enum):
    """Broken rules the simulator can inject into every node of a run."""

    DOUBLE_VOTE = "double-vote"  # vote for every up-to-date candidate, even twice in a term
    STALE_VOTE = "stale-vote"  # vote without the election restriction (log at least as new)


class Property(str, Enum):
    ELECTION_SAFETY = "election safety"
    LOG_MATCHING = "log matching"
    LEADER_COMPLETENESS = "leader completeness"
    STATE_MACHINE_SAFETY = "state machine safety"
    CORE_INVARIANT = "core invariant"  # the core itself refused a state (InvalidStateError)
    WIRE_CODEC = "wire codec"  # a message the core sent did not survive encode and decode


@dataclass(frozen=True)
class Violation:
    """A safety property that failed, with what is needed to replay it."""

    seed: int
    step: int
    property: Property
    detail: str

    def __str__(self) -> str:
        return f"seed {self.seed}, step {self.step}: {self.property.value} violated: {self.detail}"


@dataclass(frozen=True)
class SimResult:
    """The outcome of one seed."""

    seed: int
    violation: Violation | None
    live: bool
    leaders: int
    committed: int
    messages: int


@dataclass
class Summary:
    """The outcome of many seeds."""

    seeds: int = 0
    violations: list[Violation] = field(default_factory=list)
    not_live: list[int] = field(default_factory=list)
    leaders: int = 0
    committed: int = 0
    messages: int = 0
    seconds: float = 0.0


class _Stop(Exception):
    def __init__(self, prop: Property, detail: str) -> None:
        super().__init__(detail)
        self.property = prop
        self.detail = detail


class _BuggyNode(RaftNode):
    """A node with some of Raft's rules deliberately broken."""

    def __init__(self, config: Config, rng: random.Random, state: PersistedState, bugs: frozenset[Bug]) -> None:
        super().__init__(config, rng, state)
        self.bugs = bugs

    def _may_vote_for(self, msg: VoteRequest) -> bool:
        if Bug.DOUBLE_VOTE in self.bugs and not msg.pre_vote:
            return self.log.is_up_to_date(msg.last_index, msg.last_term)
        if Bug.STALE_VOTE in self.bugs:
            return self.vote in (None, msg.frm) or msg.pre_vote
        return super()._may_vote_for(msg)


@dataclass
class _Disk:
    """What one node persisted; it survives crashes."""

    hard_state: HardState = HardState()
    snapshot: Snapshot = Snapshot()
    entries: list[Entry] = field(default_factory=list)

    def persist(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot, self.entries = rd.snapshot, []
        if rd.entries:
            keep = rd.entries[0].index - self.snapshot.index - 1
            del self.entries[keep:]
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def compact(self, snap: Snapshot) -> None:
        self.entries = [e for e in self.entries if e.index > snap.index]
        self.snapshot = snap

    def state(self) -> PersistedState:
        return PersistedState(self.hard_state, self.snapshot, tuple(self.entries))


@dataclass
class _App:
    """The replicated state machine: a hash chain over every entry applied."""

    index: int = 0
    digest: bytes = b""

    def snapshot_data(self) -> bytes:
        return self.index.to_bytes(8, "big") + self.digest

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> _App:
        return cls(int.from_bytes(snap.data[:8], "big"), snap.data[8:]) if snap.data else cls()


class Simulation:
    """One seeded run of a cluster under faults (see the module rules).

    Args:
        seed: decides the cluster, the fault rates and every choice of the run.
        steps: ticks with faults before the liveness phase.
        bugs: broken rules to inject.
    """

    def __init__(self, seed: int, steps: int = DEFAULT_STEPS, bugs: Iterable[Bug] = ()) -> None:
        self.seed = seed
        self.steps = steps
        self.rng = rng = random.Random(seed)
        self.voters = tuple(f"n{i}" for i in range(rng.choice((3, 5))))
        self.learners = ("l0",) if rng.random() < 0.5 else ()
        self.loss = rng.uniform(0.0, 0.2)
        self.duplication = rng.uniform(0.0, 0.1)
        self.max_delay = rng.randint(1, 3)
        self.ready_rate = rng.uniform(0.5, 1.0)
        self.bugs = frozenset(bugs)
        self.disks = {m: _Disk() for m in (*self.voters, *self.learners)}
        self.apps = {m: _App() for m in self.disks}
        self.nodes: dict[str, RaftNode | None] = {m: self._boot(m) for m in self.disks}
        self.groups: dict[str, int] | None = None
        self.one_way: set[tuple[str, str]] = set()  # (from, to) links that lose everything
        self.wire: list[tuple[int, float, Message]] = []
        self.now = 0
        self.messages = 0
        # What every node ever persisted, committed and applied, to compare against.
        self.leaders: dict[int, str] = {}
        self.entry_at: dict[tuple[int, int], tuple[bytes, int, int | None]] = {}
        self.committed: dict[int, int] = {}
        self.commit_mark = 0  # the highest index recorded in `committed` from a leader's commit index
        self.applied_at: dict[int, tuple[int, bytes]] = {}
        self.digest_at: dict[int, bytes] = {0: b""}
        self.complete_terms: set[int] = set()  # terms whose leader passed the completeness check

    # ------------------------------------------------------------------- the run

    def run(self) -> SimResult:
        """Run the faulty phase, then the liveness phase; stop at the first violation."""
        violation, live = None, False
        try:
            for _ in range(self.steps):
                self._step(faults=True)
            live = self._settle()
        except _Stop as stop:
            violation = Violation(self.seed, self.now, stop.property, stop.detail)
        return SimResult(self.seed, violation, live, len(self.leaders), len(self.committed), self.messages)

    def _step(self, *, faults: bool) -> None:
        rng = self.rng
        if faults:
            self._inject_faults()
            if rng.random() < 0.3:
                self._propose(f"{self.seed}:{self.now}".encode())
        self._deliver()
        for node in self.nodes.values():
            if node is not None:
                node.tick()
        for name, node in self.nodes.items():
            if node is not None and (not faults or rng.random() < self.ready_rate):
                self._handle_ready(name, node)
        self._check_leaders()
        self.now += 1

    def _settle(self) -> bool:
        """Heal everything; a leader must emerge and commit a proposal on every voter."""
        self.groups = None
        self.one_way.clear()
        self.loss = self.duplication = 0.0
        for name, node in self.nodes.items():
            if node is None:
                self._restart(name)
        target: int | None = None
        for _ in range(SETTLE_TICKS):
            self._step(faults=False)
            leader = next((n for n in self.nodes.values() if n is not None and n.role is Role.LEADER), None)
            if leader is None:
                continue
            if target is None or leader.log.term(target) is None:
                target = self._propose(b"settle")
            if target is not None and all(self.apps[v].index >= target for v in self.voters):
                return True
        return False

    # ---------------------------------------------------------------- the faults

    def _inject_faults(self) -> None:
        rng = self.rng
        members = list(self.nodes)
        if self.groups is None and rng.random() < 0.03:
            self.groups = {m: rng.randrange(2) for m in members}
        elif self.groups is not None and rng.random() < 0.08:
            self.groups = None
        if rng.random() < 0.01:
            self.one_way.add((rng.choice(members), rng.choice(members)))
        elif self.one_way and rng.random() < 0.05:
            self.one_way.clear()
        running = [m for m in members if self.nodes[m] is not None]
        if running and rng.random() < 0.015:
            self.nodes[rng.choice(running)] = None
        for name in members:
            if self.nodes[name] is None and rng.random() < 0.1:
                self._restart(name)
        running = [m for m in members if self.nodes[m] is not None]
        if running and rng.random() < 0.03:
            self._compact(rng.choice(running))

    def _boot(self, name: str) -> RaftNode:
        config = Config(name, self.voters, self.learners, election_ticks=ELECTION_TICKS, heartbeat_ticks=1)
        rng, state = random.Random(self.rng.getrandbits(64)), self.disks[name].state()
        return _BuggyNode(config, rng, state, self.bugs) if self.bugs else RaftNode(config, rng, state)

    def _restart(self, name: str) -> None:
        self.nodes[name] = self._boot(name)
        self.apps[name] = _App.from_snapshot(self.disks[name].snapshot)

    def _compact(self, name: str) -> None:
        node, app = self.nodes[name], self.apps[name]
        assert node is not None
        if app.index > node.log.snapshot.index:
            self.disks[name].compact(node.compact(app.index, app.snapshot_data()))

    def _propose(self, data: bytes) -> int | None:
        leaders = [n for n in self.nodes.values() if n is not None and n.role is Role.LEADER]
        node = self.rng.choice(leaders) if leaders else self.nodes[self.rng.choice(self.voters)]
        if node is None:
            return None
        try:
            return node.propose(data)
        except NotLeaderError:
            return None

    # --------------------------------------------------------------- the network

    def _send(self, msg: Message) -> None:
        rng = self.rng
        self.messages += 1
        if rng.random() < self.loss:
            return
        if rng.random() < CODEC_SAMPLE:
            try:
                msg = decode_message(encode_message(msg))
            except MeshError as err:
                raise _Stop(Property.WIRE_CODEC, f"{msg} was refused: {err.message}") from None
        for _ in range(2 if rng.random() < self.duplication else 1):
            heapq.heappush(self.wire, (self.now + rng.randint(1, self.max_delay), rng.random(), msg))

    def _deliver(self) -> None:
        while self.wire and self.wire[0][0] <= self.now:
            _, _, msg = heapq.heappop(self.wire)
            node = self.nodes[msg.to]
            if node is None or (self.groups is not None and self.groups[msg.frm] != self.groups[msg.to]):
                continue
            if (msg.frm, msg.to) in self.one_way:
                continue
            try:
                node.step(msg)
            except InvalidStateError as err:
                raise _Stop(Property.CORE_INVARIANT, f"{msg.to}: {err.message}") from None
            if node.role is Role.LEADER:
                self._check_leader(msg.to, node)

    # ------------------------------------------------------ ready and the checks

    def _handle_ready(self, name: str, node: RaftNode) -> None:
        if not node.has_ready():
            return
        rd = node.ready()
        self._check_log_matching(name, node, rd.entries)
        self.disks[name].persist(rd)
        for msg in rd.messages:
            self._send(msg)
        app = self.apps[name]
        if rd.snapshot is not None:
            installed = _App.from_snapshot(rd.snapshot)
            self._check_digest(name, installed.index, installed.digest)
            self.apps[name] = app = installed
        for entry in rd.committed_entries:
            self._apply(name, app, entry)
        node.advance(rd)

    def _apply(self, name: str, app: _App, entry: Entry) -> None:
        if entry.index != app.index + 1:
            raise _Stop(Property.STATE_MACHINE_SAFETY, f"{name} applied {entry.index} after {app.index}")
        seen = self.applied_at.setdefault(entry.index, (entry.term, entry.data))
        if seen != (entry.term, entry.data):
            raise _Stop(
                Property.STATE_MACHINE_SAFETY,
                f"{name} applied {entry.data!r} (term {entry.term}) at {entry.index}, "
                f"another node applied {seen[1]!r} (term {seen[0]})",
            )
        self.committed[entry.index] = entry.term
        app.index = entry.index
        app.digest = hashlib.blake2b(app.digest + entry.data, digest_size=16).digest()
        self._check_digest(name, app.index, app.digest)

    def _check_digest(self, name: str, index: int, digest: bytes) -> None:
        if self.digest_at.setdefault(index, digest) != digest:
            raise _Stop(Property.STATE_MACHINE_SAFETY, f"{name}'s state after index {index} differs from another's")

    def _check_log_matching(self, name: str, node: RaftNode, entries: Sequence[Entry]) -> None:
        for entry in entries:
            value = (entry.data, int(entry.kind), node.log.term(entry.index - 1))
            seen = self.entry_at.setdefault((entry.index, entry.term), value)
            if seen != value:
                raise _Stop(
                    Property.LOG_MATCHING,
                    f"{name} holds a different entry or history at index {entry.index}, term {entry.term}",
                )

    def _check_leaders(self) -> None:
        for name, node in self.nodes.items():
            if node is not None and node.role is Role.LEADER:
                self._check_leader(name, node)
                self._record_commits(name, node)

    def _record_commits(self, name: str, node: RaftNode) -> None:
        """Entries a leader counts as committed are committed, even before anyone applies them."""
        for index in range(max(self.commit_mark, node.log.snapshot.index) + 1, node.commit_index + 1):
            term = node.log.term(index)
            assert term is not None  # between the snapshot and the commit index
            if self.committed.setdefault(index, term) != term:
                raise _Stop(
                    Property.STATE_MACHINE_SAFETY,
                    f"{name} committed index {index} in term {term}, another entry (term "
                    f"{self.committed[index]}) was committed there before",
                )
        self.commit_mark = max(self.commit_mark, node.commit_index)

    def _check_leader(self, name: str, node: RaftNode) -> None:
        other = self.leaders.setdefault(node.term, name)
        if other != name:
            raise _Stop(Property.ELECTION_SAFETY, f"{other} and {name} are both leaders of term {node.term}")
        if node.term in self.complete_terms:
            return
        first = node.log.snapshot.index
        for index, term in self.committed.items():
            if index > first and node.log.term(index) != term:
                raise _Stop(
                    Property.LEADER_COMPLETENESS,
                    f"{name} leads term {node.term} without committed entry {index} (term {term})",
                )
        self.complete_terms.add(node.term)


def run_seeds(seeds: Iterable[int], steps: int = DEFAULT_STEPS, bugs: Iterable[Bug] = ()) -> Summary:
    """Run every seed and add up the results."""
    bugs = tuple(bugs)
    summary = Summary()
    started = time.perf_counter()
    for seed in seeds:
        result = Simulation(seed, steps, bugs).run()
        summary.seeds += 1
        summary.leaders += result.leaders
        summary.committed += result.committed
        summary.messages += result.messages
        if result.violation is not None:
            summary.violations.append(result.violation)
        elif not result.live:
            summary.not_live.append(seed)
    summary.seconds = time.perf_counter() - started
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mesh.cluster.sim`: run seeds, print what broke and how fast; 1 on a violation."""
    parser = argparse.ArgumentParser(prog="python -m mesh.cluster.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2000, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="faulty ticks per seed")
    parser.add_argument("--bug", action="append", default=[], choices=[b.value for b in Bug],
                        help="inject a broken rule (to see the checks catch it)")
    args = parser.parse_args(argv)
    bugs = [Bug(b) for b in args.bug]
    summary = run_seeds(range(args.start, args.start + args.seeds), args.steps, bugs)
    rate = summary.seeds / summary.seconds if summary.seconds else 0.0
    print(f"seeds {args.start}..{args.start + args.seeds - 1} ({summary.seeds}), {args.steps} steps each")
    print(f"violations: {len(summary.violations)}")
    print(f"liveness failures (no commit within {SETTLE_TICKS} healed ticks): {len(summary.not_live)}"
          + (f" seeds {summary.not_live[:10]}" if summary.not_live else ""))
    print(f"leaders elected: {summary.leaders}, entries committed: {summary.committed}, "
          f"messages: {summary.messages}")
    print(f"time: {summary.seconds:.1f} s, {rate:.1f} seeds/s")
    for v in summary.violations:
        flags = "".join(f" --bug {b.value}" for b in bugs)
        print(f"VIOLATION {v}")
        print(f"  replay: python -m mesh.cluster.sim --start {v.seed} --seeds 1 --steps {args.steps}{flags}")
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
