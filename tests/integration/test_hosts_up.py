"""One topology file over four hosts: `mesh up FILE --host hN` per host, started at once.

The hosts are 127.0.0.1, .2, .3 (a broker each, one cluster, security on) and 127.0.0.4 (the
nodes): Linux answers all of 127/8 on the loopback interface, so no namespaces are needed
(the fault suite runs the same file shape in network namespaces). The shipped
topologies/hosts.toml runs as it is, on free ports, in a fresh directory.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterup import eventually

from mesh.testing import MeshProcess, alive, free_ports

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).parents[2]
HOSTS = {"h1": "b1", "h2": "b2", "h3": "b3", "h4": None}
NODES = {"echo-1", "echo-2", "kv"}
CREDENTIALS = "var/hosts-mesh/credentials/dev.toml"


class Hosts:
    """The four `mesh up --host` launchers and how to reach their brokers."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ups: dict[str, MeshProcess] = {}
        self.clients: dict[str, str] = {}  # broker -> its clients endpoint
        self.monitors: dict[str, str] = {}

    def start(self, host: str) -> MeshProcess:
        self.ups[host] = MeshProcess(["up", "hosts.toml", "--host", host], cwd=str(self.work))
        return self.ups[host]

    def wait_ready(self, host: str, start: int = 0) -> None:
        up, broker = self.ups[host], HOSTS[host]
        if broker is None:
            for node in sorted(NODES):
                up.wait_for(rf"\[node:{node}\] node {node} ready", start=start)
            return
        self.monitors[broker] = up.wait_for(rf"\[broker:{broker}\] broker {broker} monitor (\S+)", start=start).group(1)
        self.clients[broker] = up.wait_for(rf"\[broker:{broker}\] broker {broker} ready clients=(\S+)", start=start).group(1)

    def pids(self) -> dict[str, int]:
        """`broker:b1`, `node:kv`, ... -> pid of its latest ready line, over every launcher."""
        found: dict[str, int] = {}
        for up in self.ups.values():
            for line in up.lines:
                m = re.match(r"\[(\S+)\] .* ready .*pid=(\d+)", line)
                if m:
                    found[m.group(1)] = int(m.group(2))
        return found

    def call(self, broker: str, target: str, payload: dict[str, Any]) -> Any:
        """`mesh call` through one broker only, with the credentials the launchers made."""
        done = subprocess.run(
            [sys.executable, "-m", "mesh", "call", target, json.dumps(payload), "--broker", self.clients[broker],
             "--credentials", CREDENTIALS, "--timeout", "15"],
            check=False, capture_output=True, text=True, timeout=30, cwd=self.work,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def nodes_up(self, broker: str) -> set[str]:
        """The nodes `broker`'s monitor shows up (empty while it does not answer)."""
        token = (self.work / "var/hosts-mesh/monitor.token").read_text().strip()
        request = urllib.request.Request(f"{self.monitors[broker]}/nodes", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return {n["name"] for n in json.load(response)["nodes"] if n["state"] == "up"}
        except OSError:
            return set()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    text = (ROOT / "topologies" / "hosts.toml").read_text()
    ports = sorted(set(re.findall(r'"(?:tcp://)?127\.0\.0\.\d:(\d+)"', text)))
    assert len(ports) == 5  # clients, nodes, events, peer, monitor: the same on every host
    for old, new in zip(ports, free_ports(len(ports)), strict=True):
        text = re.sub(rf'(127\.0\.0\.\d):{old}"', rf'\g<1>:{new}"', text)
    (tmp_path / "hosts.toml").write_text(text)
    running = Hosts(tmp_path)
    try:
        for host in HOSTS:  # all four at once, against one state directory not yet made
            running.start(host)
        for host in HOSTS:
            running.wait_ready(host)
        yield running
    finally:
        for up in running.ups.values():
            up.stop(grace=30)


def test_four_hosts_serve_through_every_broker_and_a_lost_host_takes_only_its_part(hosts: Hosts):
    """The nodes on h4 register with the brokers of h1, h2 and h3; kv.incr counts exactly once and
    echo answers through each broker; SIGKILL of h1's launcher ends b1 only, the mesh keeps
    serving through b2 and b3, and h1 started again rejoins."""
    made = [line for up in hosts.ups.values() for line in up.lines if line.startswith("security: created")]
    assert len(made) == 1, made  # one launcher made the state; the three others found it
    for broker in ("b1", "b2", "b3"):
        eventually(lambda b=broker: hosts.nodes_up(b) == NODES, 20, f"every node of h4 to register with {broker}")
    for value, broker in enumerate(("b1", "b2", "b3"), 1):
        assert hosts.call(broker, "kv.incr", {"key": "hits", "by": 1}) == {"key": "hits", "value": value}
        assert hosts.call(broker, "echo.echo", {"text": broker}) == {"text": broker}

    pids = hosts.pids()
    assert set(pids) == {"broker:b1", "broker:b2", "broker:b3", "node:echo-1", "node:echo-2", "node:kv"}
    marks = {host: len(up.lines) for host, up in hosts.ups.items()}
    hosts.ups["h1"].popen.send_signal(signal.SIGKILL)
    eventually(lambda: not alive(pids["broker:b1"]), 20, "b1 to exit with its launcher")
    for value, broker in enumerate(("b2", "b3"), 4):
        assert hosts.call(broker, "kv.incr", {"key": "hits", "by": 1}) == {"key": "hits", "value": value}
        assert hosts.call(broker, "echo.echo", {"text": broker}) == {"text": broker}
    assert all(alive(pid) for name, pid in pids.items() if name != "broker:b1")
    for host in ("h2", "h3", "h4"):  # nothing of the other hosts exited or was restarted
        assert not [line for line in hosts.ups[host].lines[marks[host]:] if "exited" in line or "restarting" in line]

    mark = len(hosts.start("h1").lines)
    hosts.wait_ready("h1", start=mark)
    assert hosts.pids()["broker:b1"] != pids["broker:b1"]
    eventually(lambda: hosts.nodes_up("b1") == NODES, 20, "the nodes of h4 to register with b1 again")
    assert hosts.call("b1", "kv.incr", {"key": "hits", "by": 1}) == {"key": "hits", "value": 6}
    assert hosts.pids()["node:kv"] == pids["node:kv"]  # h4's node process is the same throughout
