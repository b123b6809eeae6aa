"""Soak: a minute of steady load while echo nodes are killed and restarted (`make soak`)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from mesh.client import Client
from mesh.testing import spawn

TOPOLOGY = """
[brokers.main]
clients = "ipc://{dir}/c.sock"
nodes = "ipc://{dir}/n.sock"

[nodes.echo]
use = "echo"
replicas = 2
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_minute_of_load_with_nodes_killed_every_ten_seconds_loses_nothing(tmp_path: Path):
    """Every call is answered, with the right result, while echo nodes are SIGKILLed and restarted."""
    (tmp_path / "mesh.toml").write_text(TOPOLOGY.format(dir=tmp_path))
    with spawn(["up", str(tmp_path / "mesh.toml")]) as up:
        up.wait_for(r"\[node:echo-1\] node .* ready")
        up.wait_for(r"\[node:echo-2\] node .* ready")
        stop = time.monotonic() + 60
        failures: list[BaseException] = []
        answered = [0]
        lock = threading.Lock()

        def load(worker: int) -> None:
            with Client(f"ipc://{tmp_path}/c.sock", timeout=20) as c:
                i = 0
                while time.monotonic() < stop:
                    text = f"{worker}-{i}"
                    try:
                        assert c.call("echo", "reverse", {"text": text}) == {"text": text[::-1]}
                        with lock:
                            answered[0] += 1
                    except BaseException as exc:  # noqa: BLE001 - collected and reported below
                        failures.append(exc)
                    i += 1

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        kills = 0
        while time.monotonic() < stop - 5:
            time.sleep(10)
            pids = {m.group(1): int(m.group(2)) for m in re.finditer(r"\[node:(echo-\d)\] node .* pid=(\d+)", "\n".join(up.lines))}
            victim = sorted(pids)[kills % len(pids)]
            os.kill(pids[victim], signal.SIGKILL)
            kills += 1
        for t in threads:
            t.join(60)
        assert failures == []
        assert kills >= 4 and answered[0] > 1000
        assert len(re.findall(r"restarting node:echo", up.output())) >= 4
