"""A tiny, fully controlled cluster of consensus cores for unit tests (`mesh.testing.raft`).

Unlike `mesh.cluster.sim` nothing here is random except the election jitter (seeded):
a test says which node ticks, which links are cut and when messages move. Each node's
Ready is handled the way an application must (persist, send, install, apply), with the
"disk" a `PersistedState` that `restart()` boots from. Use it to test an application of
`mesh.cluster` step by step; `mesh.cluster.sim` is the randomised fault search.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from ..cluster import Config, Entry, EntryKind, Message, PersistedState, RaftNode, Ready, Role

__all__ = ["Cluster"]


class Cluster:
    """Nodes, their disks, what they applied, and a queue of messages in flight."""

    def __init__(
        self, voters: Iterable[str] = ("a", "b", "c"), learners: Iterable[str] = (), seed: int = 1, **config: int
    ) -> None:
        self.voters, self.learners = tuple(voters), tuple(learners)
        self.seed = seed
        self.config = config  # further Config fields, the same for every node
        self.disks: dict[str, PersistedState] = {m: PersistedState() for m in (*self.voters, *self.learners)}
        self.nodes: dict[str, RaftNode] = {m: self._boot(m) for m in self.disks}
        self.applied: dict[str, list[Entry]] = {m: [] for m in self.disks}
        self.installed: dict[str, list[int]] = {m: [] for m in self.disks}
        self.in_flight: list[Message] = []
        self.cut: set[frozenset[str]] = set()
        self.sent: list[Message] = []

    def _boot(self, name: str) -> RaftNode:
        config = Config(name, self.voters, self.learners, election_ticks=10, heartbeat_ticks=1, **self.config)
        return RaftNode(config, random.Random(f"{self.seed}:{name}"), self.disks[name])

    def restart(self, name: str) -> RaftNode:
        """Crash `name` (losing all it did not persist) and boot it from its disk."""
        self.nodes[name] = self._boot(name)
        self.in_flight = [m for m in self.in_flight if m.to != name]
        return self.nodes[name]

    def isolate(self, name: str) -> None:
        """Cut every link of `name`: nothing moves between it and the others until `heal()`."""
        for other in self.nodes:
            if other != name:
                self.cut.add(frozenset((name, other)))

    def heal(self) -> None:
        """Restore every cut link."""
        self.cut.clear()

    def handle_ready(self, name: str) -> Ready:
        """Do what `name`'s Ready asks, in the order the core requires."""
        node = self.nodes[name]
        rd = node.ready()
        disk = self.disks[name]
        snapshot, entries = disk.snapshot, list(disk.entries)
        if rd.snapshot is not None:
            snapshot, entries = rd.snapshot, []
            self.installed[name].append(rd.snapshot.index)
        if rd.entries:
            entries = [e for e in entries if e.index < rd.entries[0].index] + list(rd.entries)
        self.disks[name] = PersistedState(rd.hard_state or disk.hard_state, snapshot, tuple(entries))
        self.in_flight.extend(rd.messages)
        self.sent.extend(rd.messages)
        self.applied[name].extend(e for e in rd.committed_entries if e.kind is EntryKind.NORMAL)
        node.advance(rd)
        return rd

    def compact(self, name: str, index: int, data: bytes = b"state") -> None:
        """Snapshot `name` at `index` with `data` and drop the entries it covers from its disk."""
        snap = self.nodes[name].compact(index, data)
        disk = self.disks[name]
        entries = tuple(e for e in disk.entries if e.index > index)
        self.disks[name] = PersistedState(disk.hard_state, snap, entries)

    def settle(self, drop: Callable[[Message], bool] = lambda m: False, limit: int = 10_000) -> None:
        """Handle every Ready and deliver every message until nothing moves."""
        for _ in range(limit):
            for name, node in self.nodes.items():
                if node.has_ready():
                    self.handle_ready(name)
            if not self.in_flight:
                return
            batch, self.in_flight = self.in_flight, []
            for msg in batch:
                if frozenset((msg.frm, msg.to)) not in self.cut and not drop(msg):
                    self.nodes[msg.to].step(msg)
        raise AssertionError("the cluster did not settle")

    def tick(self, name: str, times: int = 1) -> None:
        """Tick `name` alone `times` times, moving no message."""
        for _ in range(times):
            self.nodes[name].tick()

    def tick_all(self, times: int = 1) -> None:
        """Tick every node `times` times, settling after each round."""
        for _ in range(times):
            for node in self.nodes.values():
                node.tick()
            self.settle()

    def elect(self, name: str) -> RaftNode:
        """Time `name` out and let its election run; returns the node, now leader."""
        node = self.nodes[name]
        for _ in range(100):
            node.tick()
            if node.role is not Role.FOLLOWER:
                break
        self.settle()
        assert node.role is Role.LEADER, node.status()
        return node

    def leaders(self) -> list[str]:
        """The nodes that are leader now (more than one only across terms)."""
        return [n for n, node in self.nodes.items() if node.role is Role.LEADER]

    def applied_data(self, name: str) -> list[bytes]:
        """The data of the normal entries `name` applied, in order."""
        return [e.data for e in self.applied[name]]
