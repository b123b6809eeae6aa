"""Every command ends in exactly one answer and one final state, and the counters agree."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.broker import Broker, BrokerConfig, Command, Outgoing, Side
from mesh.protocol import FINAL_STATES, CommandState, ErrorCode, InternalError, MessageType
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
    register,
    reply,
)

NODE_C = b"node-c"
CLIENTS = (CLIENT, CLIENT_B, b"client-3")
NODES = {
    NODE_A: ({"echo": ["say", "shout"]}, 2),
    NODE_B: ({"echo": ["say"], "kv": ["get"]}, 1),
    NODE_C: ({"kv": ["get"]}, 3),
}
TARGETS = (("echo", "say"), ("echo", "shout"), ("kv", "get"), ("nope", "x"))
OUTCOMES = ("completed", "failed", "timed_out")


def _outcomes(broker: Broker) -> int:
    return sum(broker.counters[k] for k in OUTCOMES)


def test_counters_agree_over_a_mixed_run() -> None:
    """A run with each kind of outcome gives completed/failed/timed_out that match the answers."""
    broker = Broker(BrokerConfig(queue_limit=1))
    register(broker, NODE_A, {"echo": ["say"]})
    seen: list[Command] = []
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="ok"), 1.0))[2]
    seen.append(broker.commands[(CLIENT, "ok")])
    broker.client_message(CLIENT, command_frames("echo", "say", id="late", deadline=3.0), 1.0)
    seen.append(broker.commands[(CLIENT, "late")])
    broker.client_message(CLIENT, command_frames("echo", "say", id="full"), 1.0)  # queue full
    broker.client_message(CLIENT, command_frames("nope", "x", id="nf"), 1.0)  # no handler
    broker.client_message(CLIENT, command_frames("echo", "say", id="ok"), 1.5)  # duplicate
    broker.tick(3.0)  # "late" times out in the queue
    out = broker.node_message(NODE_A, reply(d1), 4.0)
    assert only(out)[1] == CLIENT
    d2 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="bad"), 5.0))[2]
    seen.append(broker.commands[(CLIENT, "bad")])
    broker.node_message(NODE_A, error_reply(d2, InternalError("boom")), 6.0)
    c = broker.counters
    # NODE_A's own mesh.register is the other completed command; a node's commands are
    # not counted in commands_received, which counts what clients send.
    assert (c["completed"], c["failed"], c["timed_out"]) == (2, 3, 1)
    assert c["registrations"] == 1
    assert c["commands_received"] == _outcomes(broker) - c["registrations"] + c["duplicates"]
    assert c["dispatched"] == 2
    assert [cmd.state for cmd in seen] == [CommandState.COMPLETED, CommandState.TIMED_OUT, CommandState.FAILED]


def test_system_commands_are_counted_as_outcomes() -> None:
    """Answered `mesh.*` commands count as completed and refused ones as failed, from clients and nodes."""
    broker = Broker()
    for action in ("ping", "services", "stats"):
        broker.client_message(CLIENT, command_frames("mesh", action), 1.0)
    broker.client_message(CLIENT, command_frames("mesh", "nope"), 1.0)
    broker.client_message(CLIENT, command_frames("mesh", "register"), 1.0)
    assert broker.counters["commands_received"] == 5
    assert (broker.counters["completed"], broker.counters["failed"]) == (3, 2)
    register(broker, NODE_A, {"echo": ["say"]}, now=2.0)
    broker.node_message(NODE_A, node_system("heartbeat", now=3.0), 3.0)
    broker.node_message(NODE_A, node_system("unregister", now=4.0), 4.0)
    refused = broker.node_message(NODE_A, node_system("register", {"name": "x"}, now=5.0), 5.0)
    assert error_of(only(refused)[2]).code == ErrorCode.VALIDATION_FAILED
    assert (broker.counters["completed"], broker.counters["failed"]) == (6, 3)
    assert broker.counters["commands_received"] == 5  # a node's own commands are not client commands


def test_abandoned_command_ends_in_a_final_state() -> None:
    """Commands whose client vanished end FAILED, leave the broker, and count only as abandoned."""
    broker = Broker()
    register(broker, NODE_A, {"echo": ["say"]})
    d1 = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="c2"), 1.0) == []
    cmds = [broker.commands[(CLIENT, "c1")], broker.commands[(CLIENT, "c2")]]
    assert [c.state for c in cmds] == [CommandState.DISPATCHED, CommandState.QUEUED]
    before = {k: broker.counters[k] for k in OUTCOMES}
    assert broker.undeliverable(Side.CLIENT, CLIENT, [b"h", b"p"], 2.0) == []
    assert [c.state for c in cmds] == [CommandState.FAILED, CommandState.FAILED]
    assert all(c.state in FINAL_STATES for c in cmds)
    assert not broker.commands and broker.queued == 0 and not any(broker.queues.values())
    assert CLIENT not in broker.clients
    assert broker.counters["abandoned"] == 2
    assert {k: broker.counters[k] for k in OUTCOMES} == before
    # NODE_A still runs c1: its reply is late, frees the slot and goes nowhere.
    assert broker.registry.nodes[NODE_A].in_flight == 1
    assert broker.node_message(NODE_A, reply(d1), 3.0) == []
    assert broker.counters["late_replies"] == 1
    assert broker.registry.nodes[NODE_A].in_flight == 0


# --------------------------------------------------------- randomised runs


@dataclass
class Model:
    """What the test knows independently of the broker."""

    broker: Broker
    now: float = 100.0  # so that now + a negative offset is still a valid deadline
    next_id: int = 0
    open: set[tuple[bytes, str]] = field(default_factory=set)  # accepted, not yet answered
    answered: int = 0
    work: list[tuple[bytes, list[bytes]]] = field(default_factory=list)  # dispatches nodes hold
    node_answers: int = 0  # answers to the nodes' own mesh.* commands (registrations)
    seen: dict[int, Command] = field(default_factory=dict)
    abandoned: set[int] = field(default_factory=set)

    def take(self, out: list[Outgoing]) -> None:
        """Check and record what the broker sent."""
        for side, ident, frames in out:
            if side is Side.NODE:
                assert frames[0], "only `register` answers a node, and it takes that answer"
                self.work.append((ident, frames))
                continue
            h = header_of(frames)
            assert h.type in (MessageType.RESPONSE, MessageType.ERROR)
            key = (ident, h.correlation_id)
            assert key in self.open, f"answer to {key} that is not open (twice, or abandoned)"
            self.open.discard(key)
            self.answered += 1

    def check(self) -> None:
        """Invariants that hold after every step."""
        b = self.broker
        for cmd in b.commands.values():
            self.seen.setdefault(id(cmd), cmd)
            assert cmd.state in (CommandState.QUEUED, CommandState.DISPATCHED)
            assert (cmd.client, cmd.id) in self.open
        queued = [c for q in b.queues.values() for c in q]
        assert b.queued == len(queued)
        assert all(c.state is CommandState.QUEUED and c.node is None for c in queued)
        assert {id(c) for c in queued} == {id(c) for c in b.commands.values() if c.state is CommandState.QUEUED}
        for cmd in b.commands.values():
            if cmd.state is CommandState.DISPATCHED:
                assert cmd.node is not None and b.registry.nodes.get(cmd.node.identity) is cmd.node
        for ident, node in b.registry.nodes.items():
            really = sum(1 for n, _ in self.work if n == ident)
            assert really <= node.capacity, f"{ident!r} holds {really} > capacity {node.capacity}"
            assert node.in_flight == really
            assert node.owed is b.node_links[ident].pending_commands
        c = b.counters
        assert _outcomes(b) == self.answered + self.node_answers
        client_outcomes = _outcomes(b) - self.node_answers
        assert c["commands_received"] == client_outcomes + c["duplicates"] + c["abandoned"] + len(b.commands)


_send = st.tuples(
    st.just("send"), st.sampled_from(CLIENTS), st.sampled_from(TARGETS),
    st.one_of(st.none(), st.floats(-1.0, 20.0)),
)
_reply = st.tuples(st.just("reply"), st.integers(0, 50), st.booleans())
# Sends and replies are listed several times so that they dominate a run.
_ops = st.one_of(
    _send, _reply, _send, _reply, _send,
    st.tuples(st.just("resend"), st.integers(0, 50)),
    st.tuples(st.just("tick"), st.floats(0.0, 10.0)),
    st.tuples(st.just("lose_node"), st.integers(0, 50), st.integers(0, 3)),
    st.tuples(st.just("lose_client"), st.sampled_from(CLIENTS)),
    st.tuples(st.just("register"), st.sampled_from(sorted(NODES))),
    st.tuples(st.just("drain")),
)


def _step(m: Model, op: tuple) -> None:
    b = m.broker
    kind = op[0]
    if kind == "send":
        _, client, (svc, act), dl = op
        m.next_id += 1
        cid = f"c{m.next_id}"
        m.open.add((client, cid))
        deadline = None if dl is None else m.now + dl
        m.take(b.client_message(client, command_frames(svc, act, id=cid, deadline=deadline), m.now))
    elif kind == "resend" and m.open:
        client, cid = sorted(m.open)[op[1] % len(m.open)]
        cmd = b.commands[(client, cid)]
        assert b.client_message(client, [cmd.header, cmd.payload], m.now) == []
    elif kind == "reply" and m.work:
        ident, frames = m.work.pop(op[1] % len(m.work))
        r = error_reply(frames, InternalError("x"), now=m.now) if op[2] else reply(frames, now=m.now)
        m.take(b.node_message(ident, r, m.now))
    elif kind == "tick":
        m.now += op[1]
        m.take(b.tick(m.now))
    elif kind == "lose_node" and m.work:
        ident, frames = m.work.pop(op[1] % len(m.work))
        # The first op[2] of its other dispatches were in the same unsent batch.
        more = [f for n, f in m.work if n == ident][: op[2]]
        m.work = [w for w in m.work if w[0] != ident]  # the node is gone with its work
        m.take(b.undeliverable(Side.NODE, ident, frames, m.now, more=more))
    elif kind == "lose_client":
        client = op[1]
        for (c, _), cmd in b.commands.items():
            if c == client:
                m.abandoned.add(id(cmd))
        m.open = {k for k in m.open if k[0] != client}
        m.take(b.undeliverable(Side.CLIENT, client, [b"h", b"p"], m.now))
    elif kind == "register" and op[1] not in b.registry.nodes:
        services, capacity = NODES[op[1]]
        m.work = [w for w in m.work if w[0] != op[1]]  # a fresh process
        m.take(register(b, op[1], services, capacity=capacity, now=m.now))
        m.node_answers += 1
    elif kind == "drain" and m.next_id > 20:
        b.begin_drain()  # late in a run, so most runs route plenty first


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ops, min_size=10, max_size=80))
def test_every_command_is_answered_once_and_ends_final(ops: list[tuple]) -> None:
    """Random sends, replies, expiries and losses: one answer per command, counters agree, capacity holds."""
    m = Model(Broker(BrokerConfig(queue_limit=3, default_timeout=15.0)))
    for ident in (NODE_A, NODE_B):
        services, capacity = NODES[ident]
        register(m.broker, ident, services, capacity=capacity)
        m.node_answers += 1
    m.check()
    for op in ops:
        _step(m, op)
        m.check()
    # Let every deadline pass, then let nodes answer whatever they still hold.
    m.now += 1000.0
    m.take(m.broker.tick(m.now))
    while m.work:
        ident, frames = m.work.pop()
        m.take(m.broker.node_message(ident, reply(frames, now=m.now), m.now))
        m.check()
    assert not m.open, f"never answered: {sorted(m.open)}"
    assert not m.broker.commands and m.broker.queued == 0
    assert all(n.in_flight == 0 for n in m.broker.registry.nodes.values())
    for key, cmd in m.seen.items():
        assert cmd.state in FINAL_STATES, (cmd.client, cmd.id, cmd.state)
        if key in m.abandoned:
            assert cmd.state is CommandState.FAILED, (cmd.client, cmd.id, cmd.state)
    if m.broker.draining:
        assert m.broker.drained
