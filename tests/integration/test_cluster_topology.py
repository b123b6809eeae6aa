"""`mesh up topologies/cluster.toml`: three brokers elect a leader, serve every node, and a
SIGKILLed broker is restarted by the launcher and catches up from its peers.

The shipped file runs as it is, on free loopback ports, in a fresh directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterup import NODES, Mesh, cluster_up, eventually

from mesh.testing import alive

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with cluster_up(tmp_path) as running:
        yield running


def test_cluster_topology_survives_a_killed_broker_and_stops_cleanly(mesh: Mesh):
    """One leader for all; a SIGKILLed leader is restarted, follows the new leader and catches up;
    kv.incr counts exactly once throughout; SIGTERM leaves no process behind."""
    assert mesh.call("echo.echo", {"text": "hi"}) == {"text": "hi"}
    assert mesh.call("kv.incr", {"key": "hits", "by": 1})["value"] == 1

    pages = eventually(mesh.agreed, 10, "one leader on every broker's /cluster")
    assert {p["mode"] for p in pages.values()} == {"cluster"}
    victim = next(b for b, p in pages.items() if p["role"] == "leader")
    # heartbeat_interval = 0.5: each broker declares a node dead after 3 silent intervals.
    assert {n["liveness_s"] for n in mesh.page(victim, "/nodes")["nodes"]} == {1.5}  # type: ignore[index]
    term = pages[victim]["term"]
    old_pid = mesh.pids()[f"broker:{victim}"]
    mark = len(mesh.up.lines)
    os.kill(old_pid, signal.SIGKILL)
    mesh.up.wait_for(rf"broker:{victim} exited with -9; restarting in 0\.5s", start=mark)
    mesh.up.wait_for(rf"\[broker:{victim}\] broker {victim} ready", start=mark)
    assert mesh.pids()[f"broker:{victim}"] != old_pid and not alive(old_pid)
    # Clients may try the new process first: wait until every node has registered again.
    eventually(lambda: {n["name"] for n in (mesh.page(victim, "/nodes") or {"nodes": []})["nodes"] if n["state"] == "up"} == set(NODES),
               10, f"every node to register with the restarted {victim}")  # fmt: skip

    assert mesh.call("kv.incr", {"key": "hits", "by": 1})["value"] == 2
    pages = eventually(mesh.agreed, 15, "the restarted broker to agree on the leader")
    assert min(p["term"] for p in pages.values()) > term  # its leader died: there was an election

    assert mesh.call("kv.incr", {"key": "hits", "by": 1})["value"] == 3
    leader = pages[victim]["leader"]
    target = mesh.page(leader)["commit_index"]  # type: ignore[index]
    eventually(lambda: (mesh.page(victim) or {}).get("commit_index", 0) >= target, 10,
               f"{victim}'s commit index to reach the leader's {target}")

    children = list(mesh.pids().values())
    assert len(children) == 8 and all(alive(p) for p in children)
    mesh.up.signal(signal.SIGTERM)
    assert mesh.up.popen.wait(30) == 0, mesh.up.output()[-3000:]
    eventually(lambda: not any(alive(p) for p in children), 5, "every child to exit")
    assert "stopped" in mesh.up.output()


def test_a_policy_set_through_one_broker_is_in_force_on_all(mesh: Mesh):
    """`mesh policy set` through one broker: once committed, every broker applies it."""
    bridge = "var/cluster-mesh/credentials/bridge.toml"
    for broker in mesh.clients:
        refused = mesh.mesh("call", "kv.delete", '{"key": "k"}', broker=broker, credentials=bridge)
        assert refused.returncode == 1 and "2002" in refused.stderr  # the bridge role may not delete
    policy = (mesh.work / "var/cluster-mesh/policy.toml").read_text()
    assert 'deny = ["*.delete"]' in policy
    (mesh.work / "new-policy.toml").write_text(policy + '\n[roles.extra]\nallow = "kv.*"\nrenew = 1\n')
    bad = mesh.mesh("policy", "set", "new-policy.toml", broker=mesh.clients[1])
    assert bad.returncode == 1 and "1002" in bad.stderr and "roles.extra.allow" in bad.stderr and "roles.extra.renew" in bad.stderr
    (mesh.work / "new-policy.toml").write_text(policy.replace('deny = ["*.delete"]', 'deny = []', 1).replace(
        "[roles.bridge]\nallow = [", '[roles.bridge]\nallow = ["kv.delete", ', 1))
    done = mesh.mesh("policy", "set", "new-policy.toml", broker=mesh.clients[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["policy"]
    for broker in mesh.clients:
        allowed = mesh.mesh("call", "kv.delete", '{"key": "k"}', broker=broker, credentials=bridge)
        assert allowed.returncode == 0, (broker, allowed.stderr)
    reader = mesh.mesh("policy", "set", "new-policy.toml", broker=mesh.clients[0], credentials=bridge)
    assert reader.returncode == 1 and "2002" in reader.stderr  # only a role that may call mesh.policy
    # Each broker says once that its state directory's policy.toml is no longer what is in force.
    eventually(lambda: mesh.up.output().count("change the cluster's policy with `mesh policy set FILE`") == 3, 5,
               "every broker to warn that policy.toml is not in force: " + mesh.up.output()[-3000:])


def test_a_key_rotation_reaches_every_broker_and_a_stale_copy_neither_wins_nor_goes_unnoticed(mesh: Mesh):
    """`mesh keys rotate` on the state directory: every broker's view of the payload key ring
    (ids and times, never keys) gains the new key; a machine whose file is older says so."""
    ring_file = mesh.work / "var/cluster-mesh/keyring.json"
    old_file = ring_file.read_bytes()

    def ring(broker: str) -> dict:
        done = mesh.mesh("call", "mesh.stats", "{}", broker=broker)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout).get("keyring") or {"keys": {}}

    first = json.loads(old_file)["active"]
    eventually(lambda: all(first in ring(b)["keys"] for b in mesh.clients), 10, "the first key ring committed")
    rotated = subprocess.run(
        [sys.executable, "-m", "mesh", "keys", "rotate", "--state", "var/cluster-mesh"],
        cwd=mesh.work, capture_output=True, text=True, timeout=30, check=True,
    )
    new = json.loads(rotated.stdout)["new_key"]
    eventually(lambda: all(new in ring(b)["keys"] for b in mesh.clients), 10, "every broker to know the new key")
    view = ring(mesh.clients[2])
    assert set(view["keys"][new]) == {"active_from", "retire_at"} and view["keys"][first]["retire_at"] is not None
    assert json.loads(ring_file.read_text())["keys"][new]["key"] not in json.dumps(view)  # never a key itself

    ring_file.write_bytes(old_file)  # as if this machine's copy had not been updated
    eventually(lambda: mesh.up.output().count(f"lacks key(s) {new}") == 3, 10, "every broker to warn of its stale copy")
    assert all(new in ring(b)["keys"] for b in mesh.clients)  # the stale file did not roll the cluster back

    pids = mesh.pids()
    ring_file.write_text('{"version": 1, "keys": ')  # a broken edit: said once, no broker stops
    eventually(lambda: mesh.up.output().count("is kept as last read") == 3, 10, "every broker to warn of the bad file")
    brokers = [name for name in pids if name.startswith("broker:")]
    assert mesh.pids() == pids and all(alive(pids[b]) for b in brokers)
    assert all((mesh.page(b.split(":")[1], "/healthz") or {}).get("live") for b in brokers)
