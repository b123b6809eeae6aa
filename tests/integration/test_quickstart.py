"""The quickstart topology as `make run` starts it, driven with the real `mesh` executable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.testing import free_ports, spawn

ROOT = Path(__file__).parents[2]
MESH = str(Path(sys.executable).parent / "mesh")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory):
    """The shipped quickstart.toml on ipc:// endpoints, run in a fresh directory with sample data."""
    work = tmp_path_factory.mktemp("quickstart")
    topology = (ROOT / "topologies" / "quickstart.toml").read_text()
    topology = (
        topology.replace("tcp://127.0.0.1:5555", f"ipc://{work}/c.sock")
        .replace("tcp://127.0.0.1:5556", f"ipc://{work}/n.sock")
        .replace("tcp://127.0.0.1:5557", f"ipc://{work}/e.sock")
        .replace("127.0.0.1:8222", f"127.0.0.1:{free_ports()[0]}")
    )
    (work / "quickstart.toml").write_text(topology)
    subprocess.run([sys.executable, "-m", "mesh.nodes.sample", "var"], cwd=work, check=True, timeout=60)
    with spawn(["up", "quickstart.toml"], cwd=str(work)) as up:
        for name in ["echo-1", "echo-2", "kv", "sqlite", "fs"]:
            up.wait_for(rf"\[node:{name}\] node .* ready")
        assert (work / "var/mesh/credentials/dev.toml").exists()  # security is on, credentials made
        os.environ["MESH_CREDENTIALS"] = str(work / "var/mesh/credentials/dev.toml")
        try:
            yield f"ipc://{work}/c.sock"
        finally:
            del os.environ["MESH_CREDENTIALS"]



def call(broker: str, target: str, payload: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESH, "call", target, payload, "--broker", broker], capture_output=True, text=True, timeout=30)


def test_without_credentials_the_quickstart_refuses(quickstart):
    """Security is on: a client without credentials is refused (in the handshake), not served."""
    env = {k: v for k, v in os.environ.items() if k != "MESH_CREDENTIALS"}
    done = subprocess.run([MESH, "call", "echo.echo", "{}", "--broker", quickstart, "--timeout", "5"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1 and "2000" in done.stderr


def result(broker: str, target: str, payload: dict) -> object:
    done = call(broker, target, json.dumps(payload))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_echo(quickstart):
    """`mesh call echo.echo '{"text": "hi"}'` prints the payload back."""
    assert result(quickstart, "echo.echo", {"text": "hi"}) == {"text": "hi"}
    assert result(quickstart, "echo.reverse", {"text": "abc"}) == {"text": "cba"}


def test_kv(quickstart):
    """kv stores, reads, lists and deletes."""
    assert result(quickstart, "kv.put", {"key": "user:1", "value": {"name": "ada"}})["created"] is True
    assert result(quickstart, "kv.get", {"key": "user:1"}) == {"key": "user:1", "found": True, "value": {"name": "ada"}}
    assert result(quickstart, "kv.list", {"prefix": "user:"})["keys"] == ["user:1"]
    assert result(quickstart, "kv.delete", {"key": "user:1"})["deleted"] is True
    assert result(quickstart, "kv.get", {"key": "user:1"})["found"] is False


def test_sqlite(quickstart):
    """sqlite answers queries with column names and refuses writes."""
    rows = result(quickstart, "sqlite.query", {"sql": "select count(*) as n from products"})
    assert rows["columns"] == ["n"] and rows["rows"] == [{"n": 5}]
    refused = call(quickstart, "sqlite.query", '{"sql": "delete from products"}')
    assert refused.returncode == 1 and "2002" in refused.stderr


def test_fs(quickstart):
    """fs lists, reads and searches under its root and refuses escapes."""
    names = {e["name"] for e in result(quickstart, "fs.list", {"path": "."})["entries"]}
    assert {"README.txt", "notes"} <= names
    assert "mesh" in result(quickstart, "fs.read", {"path": "README.txt"})["text"]
    assert result(quickstart, "fs.search", {"text": "mesh"})["matches"]
    refused = call(quickstart, "fs.read", '{"path": "../quickstart.toml"}')
    assert refused.returncode == 1 and "2002 AccessDeniedError" in refused.stderr


def test_services_lists_every_action_with_its_schema(quickstart):
    """`mesh services` lists every ready action with a description and a JSON Schema."""
    done = subprocess.run([MESH, "services", "--broker", quickstart], capture_output=True, text=True, timeout=30)
    registry = json.loads(done.stdout)
    expected = {
        "echo": {"echo", "reverse"},
        "kv": {"get", "put", "delete", "list", "incr"},
        "sqlite": {"query", "tables"},
        "fs": {"list", "read", "search"},
    }
    assert {svc: set(entry["actions"]) for svc, entry in registry.items()} == expected
    assert registry["echo"]["nodes"] == 2
    assert registry["kv"]["actions"]["incr"].get("exactly_once") is True
    for entry in registry.values():
        for action in entry["actions"].values():
            assert action["description"] and action["schema"]["type"] == "object"
