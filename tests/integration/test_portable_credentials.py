"""Credentials files travel with their state directory, and `mesh call` finds them by itself.

One secure broker (with an echo node) runs from a state directory that was made in one
place and moved into another user's home before anything started, so every key any
process reads comes from the moved copy: the old place no longer exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.security.state import ensure_state
from mesh.testing import BrokerProcess, run_broker, run_node

MESH = str(Path(sys.executable).parent / "mesh")


@dataclass(frozen=True)
class MovedMesh:
    home: Path  # a fake HOME of another user
    work: Path  # a directory holding the moved state as var/mesh (the default state directory)
    state: Path
    broker: BrokerProcess


@pytest.fixture(scope="module")
def moved_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MovedMesh]:
    """A secure broker and echo node running from a state directory moved after it was made."""
    root = tmp_path_factory.mktemp("portable")
    made = root / "made-here" / "var" / "mesh"
    ensure_state(made, nodes={"echo": ["echo"]}, clients=("dev",), now=time.time())
    home = root / "home" / "other"
    work = home / "project"
    state = work / "var" / "mesh"
    state.parent.mkdir(parents=True)
    shutil.move(made, state)
    shutil.rmtree(root / "made-here")  # nothing can be read from the old place
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(state)) as b, \
            run_node("echo", b, "--credentials", str(state / "credentials" / "echo.toml")):  # fmt: skip
        yield MovedMesh(home, work, state, b)


def mesh(*args: str, cwd: Path, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `mesh` executable in `cwd`, as the user of `home`, without MESH_CREDENTIALS
    unless `env` sets it."""
    base = {k: v for k, v in os.environ.items() if k not in ("MESH_CREDENTIALS", "MESH_BROKER")}
    return subprocess.run(
        [MESH, *args], cwd=cwd, env={**base, "HOME": str(home), **(env or {})},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_moved_state_directory_works_unchanged(moved_mesh: MovedMesh, tmp_path: Path):
    """A state directory moved to another path (under another user's home) serves `mesh call`
    as it is: its credentials name their keys relative to themselves, not where they were made."""
    dev = moved_mesh.state / "credentials" / "dev.toml"
    result = mesh("call", "echo.echo", '{"text": "moved"}', "--broker", moved_mesh.broker.clients,
                  "--credentials", str(dev), cwd=tmp_path, home=moved_mesh.home)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == "moved"
    assert "made-here" not in dev.read_text()


def test_call_on_any_port_finds_the_state_directory_credentials(moved_mesh: MovedMesh):
    """`mesh call --broker tcp://127.0.0.1:PORT` (not the default 5555) with neither --credentials
    nor MESH_CREDENTIALS uses the default state directory's var/mesh/credentials/dev.toml."""
    assert not moved_mesh.broker.clients.endswith(":5555")
    result = mesh("call", "echo.echo", '{"text": "found"}', "--broker", moved_mesh.broker.clients,
                  cwd=moved_mesh.work, home=moved_mesh.home)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == "found"


def test_a_plain_broker_elsewhere_is_not_handed_the_state_directory_credentials(moved_mesh: MovedMesh):
    """From a directory holding var/mesh, a broker with security off that var/mesh does not
    record is called without credentials (it would refuse CURVE) and answers."""
    with run_broker() as plain:
        result = mesh("call", "mesh.ping", "--broker", plain.clients, cwd=moved_mesh.work, home=moved_mesh.home)
    assert result.returncode == 0, result.stderr
    assert "broker" in json.loads(result.stdout)


def test_refused_handshake_without_credentials_says_how_to_choose_them(moved_mesh: MovedMesh, tmp_path: Path):
    """With no credentials anywhere, the refusal (2000) says none were used and names
    --credentials and MESH_CREDENTIALS."""
    result = mesh("call", "mesh.ping", "--broker", moved_mesh.broker.clients, "--timeout", "20",
                  cwd=tmp_path, home=moved_mesh.home)  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "2000 " in result.stderr
    assert "no credentials were used" in result.stderr
    assert "--credentials FILE" in result.stderr and "MESH_CREDENTIALS" in result.stderr


def test_refused_handshake_names_the_credentials_file_tried(moved_mesh: MovedMesh, tmp_path: Path):
    """Credentials of another mesh (from MESH_CREDENTIALS) are refused, and the message names
    that file, where it came from, and --credentials."""
    other = ensure_state(tmp_path / "other", nodes={}, clients=("dev",), now=time.time())
    result = mesh("call", "mesh.ping", "--broker", moved_mesh.broker.clients, "--timeout", "20",
                  cwd=moved_mesh.work, home=moved_mesh.home,
                  env={"MESH_CREDENTIALS": str(other.credentials("dev"))})  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "2000 " in result.stderr
    assert f"credentials tried: {other.credentials('dev')} (from MESH_CREDENTIALS)" in result.stderr
    assert "--credentials FILE" in result.stderr
