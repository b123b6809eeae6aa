"""Every ready node's tools, as an MCP client sees them over stdio and streamable HTTP:
annotations and output schemas as declared, each call's structuredContent conforming."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from mesh.node import Node
from mesh.nodes import echo, fs, kv
from mesh.nodes import sqlite as sqlite_node
from mesh.protocol import compile_schema
from mesh.testing import run_broker, run_node, spawn

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
def ready_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    """A broker (security off) with every ready node; yields its client endpoint and each
    action's own declaration (from the same node factories, built here)."""
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
        built: list[Node] = [echo.node(), kv.node(path=str(root / "kv.sqlite3")),
                             sqlite_node.node(database=str(db)), fs.node(root=str(root / "files"))]
        yield b.clients, {f"{s}.{a}": act for n in built for (s, a), act in n.actions.items()}


@asynccontextmanager
async def session(broker: str, transport: str, tmp_path: Path) -> AsyncIterator[ClientSession]:
    """An initialized MCP session with `mesh mcp` of `broker` over `transport` (stdio or http)."""
    args = ["mcp", "--broker", broker, "--timeout", "10"]
    if transport == "stdio":
        params = StdioServerParameters(command=sys.executable, args=["-m", "mesh", *args], env=dict(os.environ))
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield s
        return
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token + "\n")
    with spawn([*args, "--http", "127.0.0.1:0", "--token-file", str(tmp_path / "token")]) as proc:
        url = proc.wait_for(r"mcp bridge ready url=(\S+)").group(1)
        async with (httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30.0) as http,
                    streamable_http_client(url, http_client=http) as (read, write),
                    ClientSession(read, write) as s):  # type: ignore[arg-type]
            await s.initialize()
            yield s


def by_mesh_name(tools: list[Any]) -> dict[str, Any]:
    """Tools keyed by their mesh name `service.action` (the `title`, where the tool name
    is a portable mapping of it; the name itself otherwise)."""
    return {t.title or t.name: t for t in tools}


TRANSPORTS: Final = pytest.mark.parametrize("transport", ["stdio", "http"])


@pytest.mark.anyio
@TRANSPORTS
async def test_each_ready_action_carries_its_declared_annotations_and_output_schema(
    ready_mesh: tuple[str, dict[str, Any]], transport: str, tmp_path: Path,
) -> None:
    """Invariant: every ready action's MCP annotations say exactly what docs/mcp.md's table
    says (read-only reads, destructive kv.put/kv.delete, nothing open-world), no more, and
    its outputSchema is the result schema its node declares."""
    broker, declared = ready_mesh
    async with session(broker, transport, tmp_path) as s:
        tools = by_mesh_name((await s.list_tools()).tools)
    assert set(tools) == set(EXPECTED_HINTS) == set(declared)
    for name, want in EXPECTED_HINTS.items():
        got = tools[name].annotations.model_dump(by_alias=True, exclude_none=True)
        assert got == want, name
        assert tools[name].output_schema == declared[name].result_schema, name


CALLS: Final = {
    "echo.echo": {"text": "hi"}, "echo.reverse": {"text": "abc"}, "kv.put": {"key": "k", "value": [1, "two"]},
    "kv.get": {"key": "k"}, "kv.incr": {"key": "n", "by": 2}, "kv.list": {}, "kv.delete": {"key": "k"},
    "sqlite.query": {"sql": "SELECT * FROM fruit"}, "sqlite.tables": {}, "fs.list": {}, "fs.read": {"path": "a.txt"},
    "fs.search": {"text": "hello"},
}


@pytest.mark.anyio
@TRANSPORTS
async def test_each_ready_tool_result_conforms_to_its_output_schema(
    ready_mesh: tuple[str, dict[str, Any]], transport: str, tmp_path: Path,
) -> None:
    """Invariant: a client may rely on outputSchema: every ready tool's structuredContent
    validates against it."""
    broker, _ = ready_mesh
    async with session(broker, transport, tmp_path) as s:
        tools = by_mesh_name((await s.list_tools()).tools)
        assert set(CALLS) == set(tools)
        for name, arguments in CALLS.items():
            result = await s.call_tool(tools[name].name, arguments)
            assert not result.is_error, (name, result.content)
            compile_schema(tools[name].output_schema)(result.structured_content)
