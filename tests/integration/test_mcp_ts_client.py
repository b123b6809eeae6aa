"""The MCP bridge driven by a client that is not the Python SDK's: the official TypeScript
SDK's (`tests/mcp-client`, installed by `make test` with npm), run with node.

Skipped, saying why, where node or the installed SDK is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from queue import Empty, Queue
from typing import TYPE_CHECKING, Any

import pytest

from mesh.testing import run_node, spawn

if TYPE_CHECKING:
    from conftest import SecureMesh

CLIENT_DIR = Path(__file__).parents[1] / "mcp-client"
SDK = CLIENT_DIR / "node_modules" / "@modelcontextprotocol" / "sdk"

pytestmark = pytest.mark.timeout(120)


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not SDK.is_dir():
        return f"the TypeScript MCP SDK is not installed (npm install --prefix {CLIENT_DIR}; `make test` does it)"
    return None


class Lines:
    """The JSON lines a running client prints, read by a thread so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.queue: Queue[dict[str, Any]] = Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.queue.put(json.loads(line))

    def next(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next line of `event`; fails on the client's error line or a timeout."""
        while True:
            try:
                item = self.queue.get(timeout=timeout)
            except Empty:
                raise AssertionError(f"no {event!r} from the node client; saw {self.seen}") from None
            self.seen.append(item)
            assert item["event"] != "error", item["message"]
            if item["event"] == event:
                return item


@pytest.fixture(params=["stdio", "http"])
def ts_client(request: pytest.FixtureRequest, secure_mesh: SecureMesh, tmp_path: Path) -> Iterator[Lines]:
    """The node client against `mesh mcp`: its child over stdio, or a bridge on HTTP with a token."""
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    bridge = ["mcp", "--broker", secure_mesh.broker.clients, "--credentials", secure_mesh.credentials("bridge"),
              "--timeout", "10"]
    with ExitStack() as stack:
        if request.param == "stdio":
            target = ["stdio", sys.executable, "-m", "mesh", *bridge]
        else:
            token = secrets.token_urlsafe(24)
            (tmp_path / "token").write_text(token + "\n")
            http = stack.enter_context(spawn([*bridge, "--http", "127.0.0.1:0", "--token-file", str(tmp_path / "token")]))
            target = ["http", http.wait_for(r"mcp bridge ready url=(\S+)").group(1), token]
        proc = subprocess.Popen(["node", str(CLIENT_DIR / "client.mjs"), *target], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=dict(os.environ))  # fmt: skip
        try:
            yield Lines(proc)
        finally:
            proc.kill()
            proc.wait()


def test_a_typescript_client_lists_calls_and_sees_a_new_node(ts_client: Lines, secure_mesh: SecureMesh) -> None:
    """The official TypeScript SDK's client initializes with the bridge (over stdio and over
    streamable HTTP with the bearer token), lists the
    tools, calls echo and kv.get, and is told (notifications/tools/list_changed) when a node
    registers, whose tool it then lists."""
    init = ts_client.next("initialized")
    assert init["capabilities"]["tools"]["listChanged"] is True
    names = ts_client.next("tools")["names"]
    assert any("echo" in n for n in names) and any("kv" in n and "get" in n for n in names)
    assert not any("late" in n for n in names)
    echo = ts_client.next("echo")
    assert not echo["isError"] and "from node" in echo["text"]
    got = ts_client.next("kv.get")
    assert not got["isError"] and json.loads(got["text"])["found"] is False
    ts_client.next("waiting")
    with run_node("mcpnodes:late", secure_mesh.broker, "--credentials", secure_mesh.credentials("late")):
        changed = ts_client.next("changed")
    assert any("late" in n and "hello" in n for n in changed["names"])
    assert ts_client.proc.wait(timeout=10) == 0
