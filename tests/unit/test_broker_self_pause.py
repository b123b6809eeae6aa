"""A broker that was itself paused gives its nodes a whole liveness window from the resume.

The broker's clock comes in as `now`; a gap of more than `SELF_PAUSE_S` between two of
its ticks (normally 50 ms apart) is its own pause (SIGSTOP, a frozen VM, a stalled loop),
during which it heard nothing. No sockets: the core and the registry are driven by hand.
"""

from __future__ import annotations

from mesh.broker import Broker
from mesh.liveness import SELF_PAUSE_S
from mesh.protocol import ErrorCode, decode_header, decode_payload
from mesh.testing.frames import CLIENT, NODE_A, NODE_B, command_frames, error_of, node_system, only, registration

INTERVAL = 0.5  # as the cluster topology's nodes: a liveness window of 1.5 s
WINDOW = 3 * INTERVAL
TICK = 0.05


def join(broker: Broker, ident: bytes, now: float) -> None:
    spec = {"description": "", "schema": {}, "idempotent": False}
    payload = registration({"svc": {"act": spec}}, name=ident.decode(), heartbeat_interval=INTERVAL)
    broker.node_message(ident, node_system("register", payload, now=now), now)


def beat(broker: Broker, ident: bytes, now: float) -> None:
    broker.node_message(ident, node_system("heartbeat", {}, now=now), now)


def run(broker: Broker, start: float, end: float, beating: tuple[bytes, ...] = ()) -> float:
    """Tick every 50 ms from `start` to `end`, the `beating` nodes heartbeating every interval."""
    now, next_beat = start, start
    while now < end - 1e-9:
        now = round(now + TICK, 6)
        if now >= next_beat:
            for ident in beating:
                beat(broker, ident, now)
            next_beat = now + INTERVAL
        broker.tick(now)
    return now


def topics(broker: Broker) -> list[str]:
    return [decode_header(frames[1]).topic for frames in broker.take_published()]


def test_a_resumed_broker_declares_no_node_dead_for_its_own_pause() -> None:
    """Invariant: a pause of the broker (a tick gap past SELF_PAUSE_S, here 20 s) longer than
    every node's window declares no node dead, and publishes mesh.broker.resumed."""
    broker = Broker()
    join(broker, NODE_A, 0.0)
    join(broker, NODE_B, 0.0)
    now = run(broker, 0.0, 2.0, beating=(NODE_A, NODE_B))
    broker.take_published()
    resumed = now + 20.0  # SIGSTOP ... SIGCONT
    assert broker.tick(resumed) == []
    assert set(broker.registry.nodes) == {NODE_A, NODE_B}
    assert broker.counters["nodes_expired"] == 0 and broker.counters["self_pauses"] == 1
    assert topics(broker) == ["mesh.broker.resumed"]
    # Their heartbeats queued during the pause arrive after the first tick: they stay.
    run(broker, resumed, resumed + 5.0, beating=(NODE_A, NODE_B))
    assert set(broker.registry.nodes) == {NODE_A, NODE_B} and broker.counters["nodes_expired"] == 0


def test_a_node_that_died_during_the_pause_is_declared_dead_one_window_after_the_resume() -> None:
    """Invariant: the grace is one liveness window from the resume, no more: a node silent
    since before the pause is declared dead (reason silent) once that window has passed,
    while a node that keeps heartbeating stays; its command is answered NODE_LOST."""
    broker = Broker()
    join(broker, NODE_A, 0.0)
    join(broker, NODE_B, 0.0)
    now = run(broker, 0.0, 1.0, beating=(NODE_A, NODE_B))
    _, ident, _ = only(broker.client_message(CLIENT, command_frames("svc", "act", id="c1", deadline=100.0), now))
    dead = NODE_A if ident == NODE_A else NODE_B  # the one running c1 is killed during the pause
    alive = NODE_B if dead == NODE_A else NODE_A
    resumed = now + 10.0
    broker.tick(resumed)
    almost = run(broker, resumed, resumed + WINDOW - TICK, beating=(alive,))
    assert dead in broker.registry.nodes  # still within its window from the resume
    out = broker.tick(almost + 2 * TICK)
    assert dead not in broker.registry.nodes and alive in broker.registry.nodes
    assert broker.counters["nodes_expired"] == 1
    assert error_of(only(out)[2]).code == ErrorCode.NODE_LOST
    events = [decode_payload(f[2]) for f in broker.take_published() if decode_header(f[1]).topic == "mesh.node.down"]
    assert [e["reason"] for e in events] == ["silent"]


def test_late_ticks_within_the_threshold_are_no_pause() -> None:
    """Invariant: only a gap past SELF_PAUSE_S excuses silence: ticks just under it apart
    still declare a silent node dead after its window."""
    broker = Broker()
    join(broker, NODE_A, 0.0)
    now, step = 0.0, SELF_PAUSE_S * 0.9
    while NODE_A in broker.registry.nodes and now < 10:
        now += step
        broker.tick(now)
    assert NODE_A not in broker.registry.nodes
    assert WINDOW < now <= WINDOW + step and broker.counters["self_pauses"] == 0
