"""Exactly-once under simulated faults: three broker cores, one log, one node, many seeds.

A deterministic simulation in the manner of FoundationDB's and TigerBeetle's: one seed
drives every choice. Clients send exactly-once commands to any broker and resend them
(same id) to any broker; brokers are paused (they keep their sockets' messages and their
beliefs, and act on them when resumed), killed and restarted (a new incarnation that
replays the log), and catch up after a pause either entry by entry or from another
broker's snapshot. Proposals are delayed, reordered or lost (a leader change); nothing
commits while fewer than two brokers run (quorum lost). The node keeps no resend table
(as with `dedupe = false`): it runs whatever reaches it.

Invariants, checked on every seed:
* no command reaches the node twice (the replicated log, not the node, stops it);
* every successful answer a client gets is the result of that one run.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest

from mesh.broker import Broker, BrokerConfig, Outgoing, Side
from mesh.cluster.shared import SharedState
from mesh.protocol import MessageType
from mesh.testing.frames import NODE_A, command_frames, header_of, node_system, payload_of, registration, reply
from mesh.testing.sharedlog import ONCE

STEP_S = 0.05
STEPS = 500  # 25 s of simulated time
COMMANDS = 40
SEEDS = 200


@dataclass
class Member:
    """One broker process: its core, its state machine, and what waits in its sockets."""

    core: Broker
    state: SharedState
    incarnation: int
    paused: bool = False
    inbox: list[tuple[str, bytes, list[bytes]]] = field(default_factory=list)  # (side, ident, frames)


class Sim:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.log: list[bytes] = []
        self.pending: list[tuple[float, bytes]] = []  # proposals on their way to the log
        self.incarnations = 0
        self.members = [self._start(i) for i in range(3)]
        self.runs: Counter[str] = Counter()  # command id -> times the node ran it
        self.node_queue: list[tuple[float, int, int, list[bytes]]] = []  # (at, broker, incarnation, frames)
        self.answers: dict[str, list[object]] = defaultdict(list)  # id -> ok payloads
        self.resend_at = {f"c{i}": self.rng.uniform(0, 5) for i in range(COMMANDS)}

    def _start(self, index: int) -> Member:
        self.incarnations += 1
        core = Broker(BrokerConfig(name=f"b{index + 1}"))
        state = SharedState(events=core.events)
        for i, entry in enumerate(self.log, 1):
            state.apply(i, entry)
        state.take_effects()
        core.join_cluster(state, self.now, run=self.incarnations)
        payload = {**registration(ONCE, capacity=64, name="node-a"), "instance": "inst-a"}
        core.node_message(NODE_A, node_system("register", payload), self.now)
        return Member(core, state, self.incarnations)

    # ------------------------------------------------------------ the nemesis

    def nemesis(self, calm: bool) -> None:
        rng = self.rng
        if calm:
            for m in self.members:
                if m.paused:
                    self._resume(m)
            return
        roll = rng.random()
        index = rng.randrange(3)
        m = self.members[index]
        if roll < 0.02 and not m.paused:
            m.paused = True
        elif roll < 0.06 and m.paused:
            self._resume(m)
        elif roll < 0.065:
            self.members[index] = self._start(index)  # killed and restarted: its inbox is lost

    def _resume(self, m: Member) -> None:
        m.paused = False
        donors = [d for d in self.members if not d.paused and d is not m and d.state.applied == len(self.log)]
        if donors and self.rng.random() < 0.5 and m.state.applied < len(self.log):
            m.state.restore(donors[0].state.snapshot())

    # ------------------------------------------------------------ one step

    def step(self, calm: bool) -> None:
        self.now += STEP_S
        self.nemesis(calm)
        self._clients()
        self._node()
        for index, m in enumerate(self.members):
            if not m.paused:
                self._run(index, m)
        self._commit()

    def _clients(self) -> None:
        for cid, at in self.resend_at.items():
            if at <= self.now and not self.answers[cid]:
                target = self.members[self.rng.randrange(3)]
                frames = command_frames("pay", "charge", id=cid, deadline=self.now + 3.0, now=self.now)
                target.inbox.append(("client", f"client-{cid}".encode(), frames))
                self.resend_at[cid] = self.now + self.rng.uniform(0.5, 4.0)

    def _node(self) -> None:
        due = [item for item in self.node_queue if item[0] <= self.now]
        self.node_queue = [item for item in self.node_queue if item[0] > self.now]
        for _, index, incarnation, frames in due:
            cid = header_of(frames).id
            self.runs[cid] += 1
            answer = reply(frames, f"ran {cid} #{self.runs[cid]}", now=self.now)
            for i, m in enumerate(self.members):
                # Every broker gets an exactly-once reply; the sender's envelope means
                # nothing to the others, and a restarted sender does not know it either.
                if i != index or m.incarnation == incarnation or self.rng.random() < 0.5:
                    m.inbox.append(("node", NODE_A, answer))

    def _run(self, index: int, m: Member) -> None:
        out: list[Outgoing] = []
        inbox, m.inbox = m.inbox, []
        for side, ident, frames in inbox:
            if side == "client":
                out += m.core.client_message(ident, frames, self.now)
            else:
                out += m.core.node_message(ident, frames, self.now)
        for i in range(m.state.applied + 1, len(self.log) + 1):
            m.state.apply(i, self.log[i - 1])
        out += m.core.apply_shared(self.now)
        out += m.core.tick(self.now)
        for record in m.core.take_proposals(self.now):
            if self.rng.random() > 0.1:  # else lost with a leader
                self.pending.append((self.now + self.rng.uniform(0, 0.5), record))
        for side, _ident, frames in out:
            if side is Side.NODE and len(frames) == 3 and header_of(frames).type is MessageType.COMMAND:
                self.node_queue.append((self.now + self.rng.uniform(0.01, 0.6), index, m.incarnation, frames))
            elif side is Side.CLIENT and header_of(frames).type is MessageType.RESPONSE:
                self.answers[header_of(frames).correlation_id].append(payload_of(frames))

    def _commit(self) -> None:
        if sum(not m.paused for m in self.members) < 2:
            return  # quorum lost: proposals wait
        due = sorted((p for p in self.pending if p[0] <= self.now), key=lambda p: p[0])
        self.pending = [p for p in self.pending if p[0] > self.now]
        self.log.extend(record for _, record in due)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_no_command_runs_twice_whatever_pauses_restarts_and_snapshots_do(seed: int) -> None:
    """Invariant: each exactly-once command reaches the node at most once, and every
    successful answer is the result of that run, under any order of pause, resume,
    snapshot restore, restart, lost or late proposal and resend (replay: this seed)."""
    sim = Sim(seed)
    for step in range(STEPS):
        sim.step(calm=step > STEPS * 0.7)
    doubled = {cid: n for cid, n in sim.runs.items() if n > 1}
    assert not doubled, f"seed {seed}: ran twice: {doubled}"
    for cid, payloads in sim.answers.items():
        assert set(payloads) <= {f"ran {cid} #1"}, f"seed {seed}: {cid} answered {payloads}"
    assert sum(1 for p in sim.answers.values() if p) >= COMMANDS // 4, "the simulation must get work done"
