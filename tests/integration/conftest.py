"""Fixtures that run real brokers and nodes as processes over ipc:// and tcp://127.0.0.1."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from mesh.client import Client
from mesh.security.state import ensure_state
from mesh.testing import BrokerProcess, run_broker, run_node

HERE = Path(__file__).parent
# So that `mesh node testnodes:node` processes can import the test nodes.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))


@pytest.fixture(params=["tcp", "ipc"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker process listening on loopback TCP or on ipc:// sockets in tmp_path."""
    if request.param == "tcp":
        endpoints = ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    else:
        endpoints = tuple(f"ipc://{tmp_path}/{side}.sock" for side in ("clients", "nodes", "events"))
    with run_broker(endpoints[0], endpoints[1], events=endpoints[2]) as b:
        yield b


@pytest.fixture
def tcp_broker() -> Iterator[BrokerProcess]:
    with run_broker() as b:
        yield b


@pytest.fixture
def client_of() -> Iterator:
    """Make clients of a broker; all are closed at the end of the test."""
    made: list[Client] = []

    def make(b: BrokerProcess, **kwargs) -> Client:
        c = Client(b.clients, **{"timeout": 10.0, **kwargs})
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


MCP_POLICY = """
[roles.bridge]
allow = ["mesh.ping", "mesh.services", "echo.*", "kv.get", "kv.put", "kv.list", "sqlite.*", "slow.*", "late.*", "clash*.*"]
deny = ["kv.delete"]
subscribe = ["mesh.service"]

[roles.admin]
allow = ["*"]

[nodes.echo]
services = ["echo"]

[nodes.kv]
services = ["kv"]

[nodes.sqlite]
services = ["sqlite"]

[nodes.slow]
services = ["slow"]

[nodes.late]
services = ["late"]

[nodes.secret]
services = ["secret"]

[nodes.clash]
services = ["clash", "clash_x", "clash-x", "clashlllllllllllllllllllllllllllllllllllllllllllllllllllllllllll"]
"""


class SecureMesh:
    """A broker with security on, the ready nodes echo, kv and sqlite, and test nodes."""

    def __init__(self, root: Path, broker: BrokerProcess) -> None:
        self.root = root
        self.broker = broker

    def credentials(self, name: str) -> str:
        return str(self.root / "state" / "credentials" / f"{name}.toml")


@pytest.fixture(scope="module")
def secure_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMesh]:
    """A secure mesh for the MCP bridge tests, shared by a module's tests."""
    root = tmp_path_factory.mktemp("mcp")
    state = root / "state"
    state.mkdir(mode=0o700)
    (state / "policy.toml").write_text(MCP_POLICY)
    nodes = {name: [name] for name in ("echo", "kv", "sqlite", "slow", "late", "secret", "clash")}
    ensure_state(state, nodes=nodes, clients={"bridge": ["bridge"], "dev": ["admin"]}, now=time.time())
    db = root / "sample.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE fruit (name TEXT, colour TEXT)")
        conn.executemany("INSERT INTO fruit VALUES (?, ?)", [("apple", "red"), ("banana", "yellow")])
    with ExitStack() as stack:
        b = stack.enter_context(run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(state)))
        mesh = SecureMesh(root, b)
        for use, name, config in (
            ("echo", "echo", {}),
            ("kv", "kv", {"path": str(root / "kv.sqlite3")}),
            ("sqlite", "sqlite", {"database": str(db)}),
            ("mcpnodes:slow", "slow", {}),
            ("mcpnodes:secret", "secret", {}),
            ("mcpnodes:clash", "clash", {}),
        ):
            stack.enter_context(
                run_node(use, b, "--credentials", mesh.credentials(name), config=json.dumps(config))
            )
        yield mesh


def clean_env() -> dict[str, str]:
    """The environment without this checkout on the path: a wheel's venv imports its own copy."""
    return {k: v for k, v in os.environ.items() if k not in ("MESH_CREDENTIALS", "PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel built from this tree as `pip install .` builds it (compiled when a C
    compiler is there), installed with no extras into a fresh venv: built once per session.

    Under pytest-xdist (`make test` runs two workers) the workers share one build: the
    first to get here makes it in the run's common temporary directory under a lock, the
    other waits for it (two builds at once would cost each other a CPU for half a minute).

    Returns:
        The wheel's path and the venv's directory.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _build_wheel_venv(tmp_path_factory.mktemp("wheel"))
    shared = tmp_path_factory.getbasetemp().parent  # this run's directory, parent of every worker's
    with open(shared / "wheel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        root = shared / "wheel"
        done = root / "built.json"
        if done.exists():
            wheel, venv = json.loads(done.read_text())
            return Path(wheel), Path(venv)
        shutil.rmtree(root, ignore_errors=True)  # a build that failed in the other worker
        root.mkdir()
        wheel, venv = _build_wheel_venv(root)
        done.write_text(json.dumps([str(wheel), str(venv)]))
        return wheel, venv


def _build_wheel_venv(root: Path) -> tuple[Path, Path]:
    """`pip wheel` of this tree into root/dist, installed with no extras into root/venv."""
    repo = HERE.parents[1]
    env = clean_env()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--quiet", "-w",
                            str(root / "dist")], env=env, capture_output=True, text=True, timeout=400)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("*.whl")
    venv = root / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], env=env,
                               capture_output=True, text=True, timeout=240)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return wheel, venv
