"""`mesh up topologies/cluster.toml` as the cluster tests run it: the shipped file on free
loopback ports, in a fresh directory, with every broker and node ready."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mesh.testing import MeshProcess, free_ports

ROOT = Path(__file__).parents[2]
BROKERS = ["b1", "b2", "b3"]
NODES = ["echo-1", "echo-2", "kv", "sqlite", "fs"]
CREDENTIALS = "var/cluster-mesh/credentials/dev.toml"


class Mesh:
    """The running `mesh up` and how to reach its brokers."""

    def __init__(self, up: MeshProcess, work: Path, clients: list[str], monitors: dict[str, str]) -> None:
        self.up, self.work, self.clients, self.monitors = up, work, clients, monitors
        self.token = (work / "var/cluster-mesh/monitor.token").read_text().strip()

    def mesh(self, *args: str, broker: str | None = None, credentials: str = CREDENTIALS) -> subprocess.CompletedProcess[str]:
        """A `mesh` command against every broker (or one) with credentials `mesh up` wrote."""
        return subprocess.run(
            [sys.executable, "-m", "mesh", *args, "--broker", broker or ",".join(self.clients),
             "--credentials", credentials],
            check=False, capture_output=True, text=True, timeout=30, cwd=self.work,
        )  # fmt: skip

    def call(self, target: str, payload: dict[str, Any]) -> Any:
        """`mesh call` with every broker's client endpoint and the admin's credentials."""
        done = self.mesh("call", target, json.dumps(payload), "--timeout", "15")
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

    def agreed(self) -> dict[str, dict[str, Any]] | None:
        """Every broker's /cluster page, once all three answer and name the same leader."""
        pages = {b: self.page(b) for b in self.monitors}
        if any(p is None for p in pages.values()):
            return None
        leaders = {p["leader"] for p in pages.values()}  # type: ignore[index]
        roles = sorted(p["role"] for p in pages.values())  # type: ignore[index]
        return pages if len(leaders) == 1 and None not in leaders and roles == ["follower", "follower", "leader"] else None  # type: ignore[return-value]

    def pids(self) -> dict[str, int]:
        """process name (`broker:b1`, `node:kv`, ...) -> pid of its latest ready line."""
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


@contextmanager
def cluster_up(work: Path) -> Iterator[Mesh]:
    """topologies/cluster.toml with each fixed port swapped for a free one, up and every node ready."""
    text = (ROOT / "topologies" / "cluster.toml").read_text()
    ports = sorted(set(re.findall(r'"(?:tcp://)?127\.0\.0\.1:(\d+)"', text)))
    assert len(ports) == 15  # 3 brokers x clients, nodes, events, peer, monitor
    for old, new in zip(ports, free_ports(len(ports)), strict=True):
        text = text.replace(f'127.0.0.1:{old}"', f'127.0.0.1:{new}"')
    (work / "cluster.toml").write_text(text)
    subprocess.run([sys.executable, "-m", "mesh.nodes.sample", "var"], cwd=work, check=True, timeout=60, capture_output=True)
    up = MeshProcess(["up", "cluster.toml"], cwd=str(work))
    try:
        clients, monitors = [], {}
        for name in BROKERS:
            clients.append(up.wait_for(rf"\[broker:{name}\] broker {name} ready clients=(\S+)").group(1))
            monitors[name] = up.wait_for(rf"\[broker:{name}\] broker {name} monitor (\S+)").group(1)
        for name in NODES:
            up.wait_for(rf"\[node:{name}\] node .* ready")
        yield Mesh(up, work, clients, monitors)
    finally:
        up.stop(grace=30)
