"""The monitor's snapshot of a broker core: built without sockets, bounded, JSON as is."""

from __future__ import annotations

import json
from types import SimpleNamespace

from mesh.broker import Broker
from mesh.monitor.snapshot import HISTORY_POINTS, LATENCY_SAMPLES, Monitor, node_state, percentile, reply_latency
from mesh.testing.frames import CLIENT, NODE_A, command_frames, node_system, only, registration, reply


def joined(interval: float = 1.0) -> Broker:
    broker = Broker()
    spec = {"description": "say it back", "schema": {}, "idempotent": True}
    payload = registration({"svc": {"act": spec}}, capacity=4, name="echo-1", heartbeat_interval=interval)
    broker.node_message(NODE_A, node_system("register", payload, now=0.0), 0.0)
    return broker


def test_a_snapshot_is_plain_json_with_every_section():
    """Every endpoint's section is there, and the whole tree survives a JSON round trip unchanged."""
    broker = joined()
    snap = Monitor("b1", 0.0).snapshot(broker, 1.0, messages_out=3)
    assert {"healthz", "varz", "nodes", "services", "clients", "cluster", "events", "errors", "history"} <= set(snap)
    assert json.loads(json.dumps(snap)) == snap
    assert snap["varz"]["uptime_s"] == 1.0 and snap["varz"]["messages"]["out"] == 3
    assert snap["services"]["services"]["svc"]["actions"]["act"] == {"idempotent": True, "description": "say it back", "queued": 0}
    assert snap["cluster"]["role"] == "standalone"


def test_a_command_shows_in_flight_then_finished_and_its_sampled_latency():
    """A dispatched command counts as in flight; the reply's latency is measured before the core retires it."""
    broker = joined()
    monitor = Monitor("b1", 0.0)
    (_, _, dispatch) = only(broker.client_message(CLIENT, command_frames("svc", "act", id="c1", deadline=99.0), 1.0))
    assert monitor.snapshot(broker, 1.1)["varz"]["commands"]["in_flight"]["dispatched"] == 1
    node_reply = reply(dispatch, {"ok": True}, now=1.25)
    latency = reply_latency(broker, node_reply, 1.25)
    assert latency is not None and abs(latency - 0.25) < 1e-9
    monitor.observe(latency)
    broker.node_message(NODE_A, node_reply, 1.25)
    varz = monitor.snapshot(broker, 1.6)["varz"]
    assert varz["commands"]["in_flight"]["dispatched"] == 0
    assert varz["commands"]["finished"]["completed"] >= 1
    assert varz["latency_ms"] == {"p50": 250.0, "p95": 250.0, "p99": 250.0, "samples": 1}
    assert reply_latency(broker, node_reply, 2.0) is None  # already answered: nothing to time


def test_nodes_go_from_up_to_suspect_to_dead_and_stay_listed_dead():
    """Silence past half the liveness window is suspect; a node the core forgot stays on the page as dead."""
    broker = joined(interval=1.0)  # liveness 3 s
    monitor = Monitor("b1", 0.0)
    broker.tick(1.0)
    assert [n["state"] for n in monitor.snapshot(broker, 1.0)["nodes"]["nodes"]] == ["up"]
    broker.tick(2.0)
    assert [n["state"] for n in monitor.snapshot(broker, 2.0)["nodes"]["nodes"]] == ["suspect"]
    broker.tick(2.75)  # ticks less than SELF_PAUSE_S apart: the broker was not paused
    broker.tick(3.5)  # the core declares it dead and forgets it
    nodes = monitor.snapshot(broker, 3.5)["nodes"]["nodes"]
    assert [(n["name"], n["state"], n["in_flight"]) for n in nodes] == [("echo-1", "dead", 0)]
    assert nodes[0]["silence_s"] == 3.5
    assert monitor.snapshot(broker, 1000.0)["nodes"]["nodes"] == []  # dead ones are kept a while only


def test_the_registry_state_wins_and_silence_decides_without_one():
    """The registry's verdict is shown as is; a node record without one is judged by its silence."""
    bare = SimpleNamespace(last_seen=0.0, liveness=3.0)
    assert [node_state(bare, t) for t in (1.0, 2.0, 3.5)] == ["up", "suspect", "dead"]
    assert node_state(SimpleNamespace(**vars(bare), state=SimpleNamespace(value="suspect")), 0.1) == "suspect"


def test_cluster_peers_are_suspect_past_one_second_and_dead_past_three_or_never_heard():
    """A peer's state in /cluster comes from its silence: > 1 s suspect, > 3 s (or never heard) dead."""
    silences = {"p0": None, "p1": 0.5, "p2": 1.0, "p3": 1.5, "p4": 3.0, "p5": 3.5}
    status = {
        "role": "leader", "leader": "b1", "term": 2, "commit_index": 5, "applied_index": 5, "last_index": 5,
        "snapshot_index": 0, "counters": {}, "peers": {name: {"voter": True, "silent_s": s} for name, s in silences.items()},
    }
    brokers = Monitor("b1", 0.0).snapshot(joined(), 10.0, cluster=status)["cluster"]["brokers"]
    assert {b["name"]: b["state"] for b in brokers} == {
        "b1": "up", "p0": "dead", "p1": "up", "p2": "up", "p3": "suspect", "p4": "suspect", "p5": "dead",
    }


def test_errors_are_counted_by_code_and_category_and_listed_when_they_grow():
    """A command nobody offers is a protocol error (1003); it shows by code, by category and among the recent."""
    broker = joined()
    monitor = Monitor("b1", 0.0)
    monitor.snapshot(broker, 0.0)
    broker.client_message(CLIENT, command_frames("nope", "act", id="c2", deadline=99.0), 0.5)
    errors = monitor.snapshot(broker, 1.0)["errors"]
    assert errors["by_code"] == [{"code": 1003, "name": "HANDLER_NOT_FOUND", "category": "protocol", "count": 1}]
    assert errors["by_category"] == {"protocol": 1, "security": 0, "system": 0}
    assert [(e["code"], e["count"]) for e in errors["recent"]] == [(1003, 1)]
    history = monitor.snapshot(broker, 2.0)["history"]
    assert history[0]["errors_per_s"]["protocol"] == 1.0


def test_rates_come_from_counter_differences_between_snapshots():
    """Throughput is messages and commands per second between two snapshots, not per message work."""
    broker = joined()
    monitor = Monitor("b1", 0.0)
    monitor.snapshot(broker, 0.0, messages_out=0, usage={"rss_bytes": 1.0, "cpu_user_s": 1.0, "cpu_system_s": 0.0})
    broker.counters["completed"] += 50
    varz = monitor.snapshot(broker, 0.5, messages_out=100, usage={"rss_bytes": 1.0, "cpu_user_s": 1.25, "cpu_system_s": 0.0})["varz"]
    assert varz["throughput"]["commands_per_s"] == 100.0
    assert varz["throughput"]["messages_out_per_s"] == 200.0
    assert varz["cpu"]["percent"] == 50.0


def test_everything_kept_is_bounded():
    """Latency samples and the chart history stop growing at their limits."""
    broker = joined()
    monitor = Monitor("b1", 0.0)
    for i in range(LATENCY_SAMPLES * 2):
        monitor.observe(i / 1e6)
    for t in range(HISTORY_POINTS + 20):
        snap = monitor.snapshot(broker, float(t))
    assert snap["varz"]["latency_ms"]["samples"] == LATENCY_SAMPLES
    assert len(snap["history"]) == HISTORY_POINTS


def test_percentile_by_nearest_rank():
    """The quantile of sorted values; None when there are none."""
    assert percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
