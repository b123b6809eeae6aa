"""The code in docs/guide.md runs as written: its node, its client and its topology."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mesh.testing import run_broker, run_node

GUIDE = Path(__file__).parents[2] / "docs" / "guide.md"
BLOCK = re.compile(r"```(\w+) file=(\S+)\n(.*?)```", re.S)


def guide_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for _, name, body in BLOCK.findall(GUIDE.read_text()):
        (tmp_path / name).write_text(body)
        files[name] = tmp_path / name
    return files


def documented_output() -> str:
    return re.search(r"Its output:\n\n```text\n(.*?)```", GUIDE.read_text(), re.S).group(1)


def test_guide_node_and_client_give_the_documented_output(tmp_path: Path, monkeypatch):
    """The guide's node serves the guide's client, which prints exactly what the guide shows."""
    files = guide_files(tmp_path)
    assert {"notes_node.py", "notes_client.py", "notes.toml"} <= set(files)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with run_broker() as broker, run_node("notes_node:node", broker):
        result = subprocess.run(
            [sys.executable, str(files["notes_client.py"])],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "MESH_BROKER": broker.clients},
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == documented_output()


def test_guide_topology_passes_the_check(tmp_path: Path):
    """The guide's topology file is valid, its node found and its config keys matched."""
    files = guide_files(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "topology", "check", str(files["notes.toml"])],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
