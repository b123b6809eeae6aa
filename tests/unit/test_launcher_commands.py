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
