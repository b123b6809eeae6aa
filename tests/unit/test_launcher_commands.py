"""How `mesh up` turns a topology into commands, checked without starting anything."""

from __future__ import annotations

import json

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


def test_each_broker_of_a_cluster_gets_every_member_its_own_data_dir_and_the_settings():
    """--member for every broker (itself included), --data DATA/NAME, --learner, --election-ticks."""
    launcher = Launcher(parse(CLUSTER))
    brokers = {p.name: p.argv for p in launcher.processes if p.is_broker}
    members = [f"b{i}=tcp://127.0.0.1:{7002 + 10 * i}" for i in range(1, 5)]
    for name, argv in brokers.items():
        assert values(argv, "--member") == members
        assert values(argv, "--data") == [f"var/c/{name.removeprefix('broker:')}"]
        assert values(argv, "--learner") == ["b4"]
        assert values(argv, "--election-ticks") == ["20"]


def test_a_node_of_a_cluster_serves_every_broker_and_a_single_broker_mesh_is_unchanged():
    """In a cluster every node is bound to all brokers; otherwise to its one broker, without cluster options."""
    launcher = Launcher(parse(CLUSTER))
    echo = next(p for p in launcher.processes if p.name == "node:echo")
    assert echo.brokers == ("b1", "b2", "b3", "b4")
    assert values(echo.argv, "--heartbeat-interval") == ["0.5"]
    single = Launcher(parse(TOPOLOGY))
    assert all(p.brokers == ("main",) for p in single.processes)
    for p in single.processes:
        assert not {"--member", "--data", "--learner", "--election-ticks", "--heartbeat-interval"} & set(p.argv)


def test_dedupe_false_reaches_the_node_as_no_dedupe():
    """`dedupe = false` (for tests of exactly-once) turns the node's resend table off; the default keeps it."""
    data = json.loads(json.dumps(TOPOLOGY))
    data["nodes"]["kv"]["dedupe"] = False
    argv = {p.name: p.argv for p in Launcher(parse(data)).processes}
    assert "--no-dedupe" in argv["node:kv"] and "--no-dedupe" not in argv["node:echo-1"]
