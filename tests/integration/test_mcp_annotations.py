"""Every ready node's tools, as an MCP client sees them over stdio: annotations as declared."""

from __future__ import annotations

import json
import os
import sys
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from mesh.testing import run_broker, run_node

# The truth about each ready action (docs/mcp.md shows the same table): all touch only
# the node's own state, so none is open-world.
READ = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False}
EXPECTED_HINTS: dict[str, dict[str, bool]] = {
    **{name: READ for name in ("echo.echo", "echo.reverse", "kv.get", "kv.list", "sqlite.query", "sqlite.tables",
                               "fs.list", "fs.read", "fs.search")},
    "kv.put": {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True, "openWorldHint": False},
    "kv.delete": {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True, "openWorldHint": False},
    "kv.incr": {"readOnlyHint": False, "destructiveHint": False, "openWorldHint": False},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ready_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker (security off) with every ready node; yields its client endpoint."""
    root = tmp_path_factory.mktemp("ready")
    (root / "files").mkdir()
    (root / "files" / "a.txt").write_text("hello\n")
    db = root / "sample.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE fruit (name TEXT, colour TEXT)")
        conn.execute("INSERT INTO fruit VALUES ('apple', 'red')")
    with ExitStack() as stack:
        b = stack.enter_context(run_broker())
        for use, config in (("echo", {}), ("kv", {"path": str(root / "kv.sqlite3")}),
                            ("sqlite", {"database": str(db)}), ("fs", {"root": str(root / "files")})):
            stack.enter_context(run_node(use, b, config=json.dumps(config)))
        yield b.clients


def bridge(broker: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "mesh", "mcp", "--broker", broker,
                                                               "--timeout", "10"], env=dict(os.environ))


async def listed(broker: str) -> dict[str, Any]:
    async with stdio_client(bridge(broker)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        return {t.name: t for t in (await session.list_tools()).tools}


@pytest.mark.anyio
async def test_each_ready_action_carries_its_declared_annotations(ready_mesh: str) -> None:
    """Invariant: every ready action's MCP annotations say exactly what docs/mcp.md's table
    says (read-only reads, destructive kv.put/kv.delete, nothing open-world), no more."""
    tools = await listed(ready_mesh)
    assert set(tools) == set(EXPECTED_HINTS)
    for name, want in EXPECTED_HINTS.items():
        got = tools[name].annotations.model_dump(by_alias=True, exclude_none=True)
        assert got == want, name
