"""`mesh up` runs a topology as real processes, restarts what crashes and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from mesh.client import Client
from mesh.testing import MeshProcess, alive, spawn

TOPOLOGY = """
[mesh]
name = "launcher-test"

[brokers.main]
clients = "ipc://{dir}/c.sock"
nodes = "ipc://{dir}/n.sock"

[nodes.worker]
use = "testnodes:node"
replicas = 2
capacity = 2
config = {{ name = "w" }}
"""


def describe(pid: int) -> str:
    """What a process is and what it is doing, for a failure message."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode()
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:")).strip()
        return f"{cmd} ({state})"
    except (FileNotFoundError, StopIteration):
        return "gone"


def pids(proc: MeshProcess, what: str) -> dict[str, int]:
    """name -> pid of the latest ready line of each process the launcher reported."""
    found: dict[str, int] = {}
    for line in proc.lines:
        m = re.match(rf"\[({what}:\S+)\] .* ready .*pid=(\d+)", line)
        if m:
            found[m.group(1)] = int(m.group(2))
    return found


@pytest.fixture
def topology(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.toml"
    path.write_text(TOPOLOGY.format(dir=tmp_path))
    return path


def test_up_serves_restarts_a_killed_node_and_stops_cleanly(topology: Path, tmp_path: Path):
    """A SIGKILLed node is restarted by `mesh up`; SIGTERM then stops every process."""
    up = MeshProcess(["up", str(topology)])
    try:
        up.wait_for("mesh is up")
        up.wait_for(r"\[node:worker-2\] node .* ready")
        up.wait_for(r"\[node:worker-1\] node .* ready")
        with Client(f"ipc://{tmp_path}/c.sock", timeout=10) as c:
            assert c.call("alpha", "whoami", {}) == {"node": "w"}
            before = pids(up, "node")
            assert len(before) == 2
            victim = before["node:worker-1"]
            os.kill(victim, signal.SIGKILL)
            mark = len(up.lines)
            up.wait_for(r"node:worker-1 exited with -9; restarting", start=mark)
            up.wait_for(r"\[node:worker-1\] node .* ready", start=mark)
            after = pids(up, "node")
            assert after["node:worker-1"] != victim
            assert not alive(victim)
            for _ in range(4):
                assert c.call("alpha", "whoami", {}) == {"node": "w"}
        children = list(pids(up, "node").values()) + list(pids(up, "broker").values())
        assert len(children) == 3 and all(alive(p) for p in children)
        up.signal(signal.SIGTERM)
        assert up.popen.wait(30) == 0
        deadline = time.monotonic() + 5
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in children), up.output()
        assert "stopped" in up.output()
    finally:
        up.stop()


def test_a_node_that_cannot_start_is_retried_with_backoff_then_given_up(tmp_path: Path):
    """A node that fails at start-up is restarted with growing pauses, given up on after
    five quick failures with a message saying so; the broker stays up, exit status 1."""
    path = tmp_path / "bad.toml"
    path.write_text(
        TOPOLOGY.format(dir=tmp_path).replace('use = "testnodes:node"', 'use = "testnodes:broken"').replace('config = { name = "w" }\n', "").replace("replicas = 2", "replicas = 1")
    )
    with spawn(["up", str(path)]) as up:
        up.wait_for("mesh is up")
        up.wait_for(r"restarting in 1\.0s", timeout=20)
        assert "restarting in 0.5s" in up.output()
        up.wait_for(r"node:worker exited with 2: 5 failures in a row, .* giving up on it", timeout=30)
        assert "restarting in 8.0s" not in up.output()
        with Client(f"ipc://{tmp_path}/c.sock", timeout=5) as c:
            assert c.call("mesh", "ping")["pong"] is True
        assert up.stop() == 1


def test_killing_the_launcher_takes_its_children_along(topology: Path):
    """Even a SIGKILLed `mesh up` leaves no orphan: its children get SIGTERM from the kernel."""
    up = MeshProcess(["up", str(topology)])
    try:
        up.wait_for(r"\[node:worker-2\] node .* ready")
        up.wait_for(r"\[node:worker-1\] node .* ready")
        children = list(pids(up, "node").values()) + list(pids(up, "broker").values())
        up.popen.kill()
        up.popen.wait()
        deadline = time.monotonic() + 25  # SIGTERM, then each child drains: generous on a loaded machine
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = {p: describe(p) for p in children if alive(p)}
        assert not survivors, f"{survivors}\n{up.output()}"
    finally:
        up.stop()


def test_a_restarted_broker_runs_the_topology_mesh_up_read_not_the_edited_file(topology: Path, tmp_path: Path):
    """Invariant: brokers start from `mesh up`'s private copy of the topology: one killed after
    the file was edited (here, broken) comes back with the settings the rest of the mesh runs,
    and the copy is removed when the mesh stops."""
    up = MeshProcess(["up", str(topology)])
    try:
        up.wait_for(r"\[broker:main\] broker .* ready")
        victim = pids(up, "broker")["broker:main"]
        argv = Path(f"/proc/{victim}/cmdline").read_bytes().decode().split("\0")
        copy = Path(argv[argv.index("--topology") + 1])
        assert copy.read_text() == topology.read_text() and copy.parent.stat().st_mode & 0o077 == 0
        topology.write_text("this is not TOML")
        mark = len(up.lines)
        os.kill(victim, signal.SIGKILL)
        up.wait_for(r"\[broker:main\] broker main ready", start=mark)
        with Client(f"ipc://{tmp_path}/c.sock", timeout=10) as c:
            assert c.call("mesh", "ping")["pong"] is True
        assert up.stop() == 0
        assert not copy.parent.exists()
    finally:
        up.stop()
