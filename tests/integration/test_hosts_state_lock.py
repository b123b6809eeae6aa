"""Launchers of several hosts started at once against one state directory (a shared filesystem)
make the keys, tokens and policy once: the first takes the lock and makes everything, the
others find it made."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.launcher import Launcher
from mesh.topology import load

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).parents[2]
LAUNCHERS = 6
ROUNDS = 8
# What `mesh up FILE --host HOST` does before it starts a process, once per round in a fresh
# directory, held at a gate so that every launcher reaches the state directory at the same
# moment (a launcher alone takes about 40 ms to make it).
PREPARE = """
import os, sys, time
from pathlib import Path
from mesh.launcher import Launcher
from mesh.topology import load

topology = load("hosts.toml")
for r in range(int(sys.argv[3])):
    Path(f"ready-{sys.argv[2]}-{r}").touch()
    while not Path(f"go-{r}").exists():
        time.sleep(0.0005)
    os.chdir(f"round-{r}")  # the state path is relative to where mesh up runs
    Launcher(topology, echo=lambda line: print(r, line, flush=True), host=sys.argv[1]).prepare_security()
    os.chdir("..")
"""


def test_launchers_started_together_make_the_state_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every file of the state is made by exactly one launcher (no key made twice, one half of
    a pair from each), and none fails on a directory or a pair another is making."""
    (tmp_path / "hosts.toml").write_text((ROOT / "topologies" / "hosts.toml").read_text())
    for r in range(ROUNDS):
        (tmp_path / f"round-{r}").mkdir()
    reference: list[str] = []
    monkeypatch.chdir(tmp_path / "round-0")
    Launcher(load("../hosts.toml"), echo=reference.append).prepare_security()
    expected = next(line for line in reference if line.startswith("security: created"))
    (tmp_path / "round-0" / "var").rename(tmp_path / "alone")

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, f"h{i % 4 + 1}", str(i), str(ROUNDS)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(LAUNCHERS)
    ]
    try:
        for r in range(ROUNDS):
            while not all((tmp_path / f"ready-{i}-{r}").exists() for i in range(LAUNCHERS)):
                if any(p.poll() is not None for p in procs):  # one failed: show what each said
                    for p in procs:
                        p.kill()
                    pytest.fail("a launcher exited early:\n" + "\n".join(p.communicate()[0] for p in procs))
                time.sleep(0.005)
            (tmp_path / f"go-{r}").touch()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * LAUNCHERS, outputs
    lines = [line for out in outputs for line in out.splitlines()]
    for r in range(ROUNDS):
        # One launcher made as many files as a launcher alone does; the others none.
        assert [line for line in lines if line.startswith(f"{r} security: created")] == [f"{r} {expected}"], outputs
