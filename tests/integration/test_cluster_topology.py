"""`mesh up topologies/cluster.toml`: three brokers elect a leader, serve every node, and a
SIGKILLed broker is restarted by the launcher and catches up from its peers.

The shipped file runs as it is, on free loopback ports, in a fresh directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.testing import MeshProcess, free_ports

ROOT = Path(__file__).parents[2]
NODES = ["echo-1", "echo-2", "kv", "sqlite", "fs"]

pytestmark = pytest.mark.timeout(90)


class Mesh:
    """The running `mesh up` and how to reach its brokers."""

    def __init__(self, up: MeshProcess, work: Path, clients: str, monitors: dict[str, str]) -> None:
        self.up, self.work, self.clients, self.monitors = up, work, clients, monitors
        self.token = (work / "var/cluster-mesh/monitor.token").read_text().strip()

    def call(self, target: str, payload: dict[str, Any]) -> Any:
        """`mesh call` with every broker's client endpoint and the credentials `mesh up` wrote."""
        done = subprocess.run(
            [sys.executable, "-m", "mesh", "call", target, json.dumps(payload), "--broker", self.clients,
             "--credentials", "var/cluster-mesh/credentials/dev.toml", "--timeout", "15"],
            check=False, capture_output=True, text=True, timeout=30, cwd=self.work,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def page(self, broker: str, path: str = "/cluster") -> dict[str, Any] | None:
        """A page of the broker's monitor, or None while it does not answer."""
        request = urllib.request.Request(f"{self.monitors[broker]}{path}", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.load(response)  # type: ignore[no-any-return]
        except OSError:
            return None

    def pids(self) -> dict[str, int]:
        """process name -> pid of its latest ready line."""
        found: dict[str, int] = {}
        for line in self.up.lines:
            m = re.match(r"\[(\S+)\] .* ready .*pid=(\d+)", line)
            if m:
                found[m.group(1)] = int(m.group(2))
        return found


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """`check()`'s first truthy result within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """topologies/cluster.toml with each fixed port swapped for a free one, up and every node ready."""
    text = (ROOT / "topologies" / "cluster.toml").read_text()
    ports = sorted(set(re.findall(r'"(?:tcp://)?127\.0\.0\.1:(\d+)"', text)))
    assert len(ports) == 15  # 3 brokers x clients, nodes, events, peer, monitor
    for old, new in zip(ports, free_ports(len(ports)), strict=True):
        text = text.replace(f'127.0.0.1:{old}"', f'127.0.0.1:{new}"')
    (tmp_path / "cluster.toml").write_text(text)
    subprocess.run([sys.executable, "-m", "nodes.sample", "var"], cwd=tmp_path, check=True, timeout=60, capture_output=True)
    up = MeshProcess(["up", "cluster.toml"], cwd=str(tmp_path))
    try:
        clients, monitors = [], {}
        for name in ("b1", "b2", "b3"):
            clients.append(up.wait_for(rf"\[broker:{name}\] broker {name} ready clients=(\S+)").group(1))
            monitors[name] = up.wait_for(rf"\[broker:{name}\] broker {name} monitor (\S+)").group(1)
        for name in NODES:
            up.wait_for(rf"\[node:{name}\] node .* ready")
        yield Mesh(up, tmp_path, ",".join(clients), monitors)
    finally:
        up.stop(grace=30)


def test_cluster_topology_survives_a_killed_broker_and_stops_cleanly(mesh: Mesh):
    """One leader for all; a SIGKILLed leader is restarted, follows the new leader and catches up;
    kv.incr counts exactly once throughout; SIGTERM leaves no process behind."""
    assert mesh.call("echo.echo", {"text": "hi"}) == {"text": "hi"}
    assert mesh.call("kv.incr", {"key": "hits", "by": 1})["value"] == 1

    def agreed() -> dict[str, dict[str, Any]] | None:
        pages = {b: mesh.page(b) for b in mesh.monitors}
        if any(p is None for p in pages.values()):
            return None
        leaders = {p["leader"] for p in pages.values()}  # type: ignore[index]
        roles = sorted(p["role"] for p in pages.values())  # type: ignore[index]
        return pages if len(leaders) == 1 and None not in leaders and roles == ["follower", "follower", "leader"] else None  # type: ignore[return-value]

    pages = eventually(agreed, 10, "one leader on every broker's /cluster")
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
    pages = eventually(agreed, 15, "the restarted broker to agree on the leader")
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
