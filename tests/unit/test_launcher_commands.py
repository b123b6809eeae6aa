"""How `mesh up` turns a topology into commands, checked without starting anything."""

from __future__ import annotations

import json

from mesh.broker.settings import SETTINGS
from mesh.launcher import Launcher
from mesh.topology import parse

TOPOLOGY = {
    "brokers": {"main": {"clients": "tcp://127.0.0.1:7001", "nodes": "tcp://127.0.0.1:7002"}},
    "nodes": {
        "kv": {"use": "kv", "config": {"path": "var/secret-kv.sqlite3"}},
        "echo": {"use": "echo", "replicas": 2, "capacity": 16},
    },
}


def test_node_capacity_is_passed_only_when_the_topology_sets_it():
    """Without `capacity` in the topology the node keeps the capacity its factory chose."""
    launcher = Launcher(parse(TOPOLOGY))
    argv = {p.name: p.argv for p in launcher.processes}
    assert "--capacity" not in argv["node:kv"]
    assert argv["node:echo-1"][argv["node:echo-1"].index("--capacity") + 1] == "16"
    assert [p.name for p in launcher.processes] == ["broker:main", "node:kv", "node:echo-1", "node:echo-2"]


def test_node_config_travels_in_the_environment_not_on_the_command_line():
    """A node's config (which may hold secrets) is never in its argv, which `ps` shows to everyone."""
    launcher = Launcher(parse(TOPOLOGY))
    kv = next(p for p in launcher.processes if p.name == "node:kv")
    assert not any("secret-kv" in arg for arg in kv.argv)
    assert json.loads(kv.env["MESH_NODE_CONFIG"]) == {"path": "var/secret-kv.sqlite3"}


CLUSTER = {
    "cluster": {"data": "var/c", "learners": ["b4"], "election_ticks": 20},
    "brokers": {
        f"b{i}": {
            "clients": f"tcp://127.0.0.1:{7000 + 10 * i}",
            "nodes": f"tcp://127.0.0.1:{7001 + 10 * i}",
            "peer": f"tcp://127.0.0.1:{7002 + 10 * i}",
        }
        for i in range(1, 5)
    },
    "nodes": {"echo": {"use": "echo", "heartbeat_interval": 0.5}},
}


def values(argv: list[str], option: str) -> list[str]:
    """Every value given to `option` in `argv`."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_a_broker_is_started_by_name_and_reads_its_settings_from_the_topology():
    """Invariant: the launcher turns no setting back into flags: a broker's argv names it and
    nothing else (the topology copy is added at start), so there is one parse of each setting."""
    for topology in (TOPOLOGY, CLUSTER):
        for p in Launcher(parse(topology)).processes:
            if p.is_broker:
                assert p.argv[-4:] == ["mesh", "broker", "--name", p.brokers[0]]
                assert not {s.option for s in SETTINGS} & set(p.argv)


def test_each_broker_of_a_cluster_gets_every_member_its_own_data_dir_and_the_settings():
    """Every member (itself included), data DATA/NAME, the learners and the election ticks."""
    topology = parse(CLUSTER)
    members = {f"b{i}": f"tcp://127.0.0.1:{7002 + 10 * i}" for i in range(1, 5)}
    for name in topology.brokers:
        settings = topology.broker_settings(name)
        assert settings.members == members
        assert settings.data == f"var/c/{name}"
        assert settings.learners == ("b4",)
        assert settings.election_ticks == 20


def test_a_node_of_a_cluster_serves_every_broker_and_a_single_broker_mesh_is_unchanged():
    """In a cluster every node is bound to all brokers; otherwise to its one broker, without cluster options."""
    launcher = Launcher(parse(CLUSTER))
    echo = next(p for p in launcher.processes if p.name == "node:echo")
    assert echo.brokers == ("b1", "b2", "b3", "b4")
    assert values(echo.argv, "--heartbeat-interval") == ["0.5"]
    single = Launcher(parse(TOPOLOGY))
    assert all(p.brokers == ("main",) for p in single.processes)
    for p in single.processes:
        assert "--heartbeat-interval" not in p.argv
    settings = parse(TOPOLOGY).broker_settings("main")
    assert (settings.members, settings.data, settings.learners, settings.election_ticks) == ({}, None, (), None)


def test_dedupe_false_reaches_the_node_as_no_dedupe():
    """`dedupe = false` (for tests of exactly-once) turns the node's resend table off; the default keeps it."""
    data = json.loads(json.dumps(TOPOLOGY))
    data["nodes"]["kv"]["dedupe"] = False
    argv = {p.name: p.argv for p in Launcher(parse(data)).processes}
    assert "--no-dedupe" in argv["node:kv"] and "--no-dedupe" not in argv["node:echo-1"]
