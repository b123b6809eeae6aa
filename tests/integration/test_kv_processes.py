"""`kv.incr` from eight processes on one SQLite file: no increment lost, no value given twice.

Each process is a real Python interpreter holding its own kv node (as the replicas of a
topology, or several meshes, share one database file); all are released together to
open the new file (switching it to WAL at once) and call the `incr` handler 500 times
on one key. SQLite serialises the writers across processes
only if each increment takes the write lock before it reads (`BEGIN IMMEDIATE`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

PROCESSES = 8
EACH = 500

WRITER = """
import json, os, sys, time
from mesh.nodes import kv
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
node = kv.node(path=sys.argv[1])  # all eight open the new file at once, as replicas starting together
incr = node.actions[("kv", "incr")].handler
values = [incr({"key": "shared", "by": 1})["value"] for _ in range(int(sys.argv[3]))]
print(json.dumps(values))
"""


def test_eight_processes_incrementing_one_key_lose_nothing(tmp_path: Path) -> None:
    """Invariant: 8 processes opening one new file at once all start, and their 8 x 500
    acknowledged increments of one key end at 4,000, the values acknowledged being exactly
    1..4,000, each once (none lost, none doubled)."""
    path = tmp_path / "kv.sqlite3"
    start = time.time() + 2.0  # every interpreter imported and waiting before the first write
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start), str(EACH)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        for _ in range(PROCESSES)
    ]
    seen: list[int] = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        seen.extend(json.loads(out))
    assert sorted(seen) == list(range(1, PROCESSES * EACH + 1))
    from mesh.nodes import kv

    node = kv.node(path=str(path))
    assert node.actions[("kv", "get")].handler({"key": "shared"})["value"] == PROCESSES * EACH
