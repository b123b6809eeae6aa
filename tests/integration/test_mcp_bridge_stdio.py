"""The MCP bridge over stdio, driven by the MCP SDK's own clients against a real secure mesh."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcpnodes import CLASH_NAMES, wait_for_file

from mesh.client import Client as MeshClient
from mesh.security.credentials import load_credentials
from mesh.testing import run_node

if TYPE_CHECKING:
    from conftest import SecureMesh


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def bridge_params(mesh: SecureMesh, *extra: str) -> StdioServerParameters:
    """How to start `mesh mcp` as the bridge client of `mesh`."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mesh", "mcp", "--broker", mesh.broker.clients, "--credentials", mesh.credentials("bridge"),
              "--timeout", "10", *extra],
        env=dict(os.environ),
    )


def text_of(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


PORTABLE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # the rule Claude's and OpenAI's tool APIs enforce



@pytest.mark.anyio
async def test_tools_are_the_actions_the_role_may_call_with_their_schemas(secure_mesh: SecureMesh) -> None:
    """tools/list names each callable action service_action with its description and schema, sorted."""
    async with stdio_client(bridge_params(secure_mesh)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = (await session.list_tools()).tools
    names = [t.name for t in tools]
    assert names == sorted(names)
    assert {"echo_echo", "kv_get", "kv_put", "kv_list", "sqlite_query", "slow_wait"} <= set(names)
    assert "kv_delete" not in names and not any(n.startswith("secret") for n in names)
    get = next(t for t in tools if t.name == "kv_get")
    assert get.title == "kv.get" and get.meta == {"mesh/name": "kv.get"}
    assert get.description == "Read the value stored under a key."
    assert get.input_schema["type"] == "object" and "key" in get.input_schema["properties"]


@pytest.mark.anyio
async def test_every_tool_name_is_portable_even_when_mesh_names_collide(secure_mesh: SecureMesh) -> None:
    """Invariant: every listed name matches ^[a-zA-Z0-9_-]{1,64}$ and names one tool, with colliding nodes registered.

    The clash node registers `clash_x.y` and `clash.x_y` (one name once `.` is `_`), and
    two 129-character names alike for their first 64; each tool reaches its own action.
    """
    async with Client(bridge_params(secure_mesh)) as client:
        tools = (await client.list_tools()).tools
        bad = [t.name for t in tools if not PORTABLE.fullmatch(t.name)]
        clash = {t.title: t.name for t in tools if t.title in CLASH_NAMES}
        answers = {m: (await client.call_tool(name, {})).structured_content["mesh_name"] for m, name in clash.items()}
        dotted = await client.call_tool("clash.x_y", {})
    assert bad == [] and len({t.name for t in tools}) == len(tools)
    assert set(clash) == set(CLASH_NAMES) and len(set(clash.values())) == len(CLASH_NAMES)
    assert all(t.meta == {"mesh/name": t.title} for t in tools)
    assert answers == {m: m for m in CLASH_NAMES}
    assert dotted.structured_content == {"mesh_name": "clash.x_y"}  # a call by the mesh name still works


@pytest.mark.anyio
async def test_the_registry_and_each_service_are_resources(secure_mesh: SecureMesh) -> None:
    """mesh://services holds what the bridge exposes; mesh://services/kv one service's schemas."""
    async with Client(bridge_params(secure_mesh, "--exclude", "echo.*")) as client:
        uris = [str(r.uri) for r in (await client.list_resources()).resources]
        registry = json.loads((await client.read_resource("mesh://services")).contents[0].text)
        kv = json.loads((await client.read_resource("mesh://services/kv")).contents[0].text)
    assert uris[0] == "mesh://services" and "mesh://services/kv" in uris and "mesh://services/echo" not in uris
    assert "echo" not in registry and set(registry["kv"]["actions"]) == {"get", "list", "put"}
    assert kv["actions"]["get"]["schema"]["required"] == ["key"]


@pytest.mark.anyio
async def test_calls_to_echo_kv_and_sqlite_return_their_results(secure_mesh: SecureMesh) -> None:
    """Tool calls run the mesh actions and return their results as JSON text and structured content."""
    async with stdio_client(bridge_params(secure_mesh)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        echo = await session.call_tool("echo.echo", {"text": "hi"})
        put = await session.call_tool("kv.put", {"key": "colour", "value": {"name": "blue"}})
        got = await session.call_tool("kv.get", {"key": "colour"})
        rows = await session.call_tool("sqlite.query", {"sql": "SELECT name FROM fruit ORDER BY name"})
    assert not echo.is_error and json.loads(text_of(echo)) == {"text": "hi"}
    assert not put.is_error
    assert got.structured_content == {"key": "colour", "found": True, "value": {"name": "blue"}}
    assert [r["name"] for r in rows.structured_content["rows"]] == ["apple", "banana"]


@pytest.mark.anyio
async def test_mesh_errors_are_tool_results_with_their_code(secure_mesh: SecureMesh) -> None:
    """A node's refusal and a payload the schema refuses both come back isError with the mesh code."""
    async with stdio_client(bridge_params(secure_mesh)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        refused = await session.call_tool("sqlite.query", {"sql": "DELETE FROM fruit"})
        invalid = await session.call_tool("kv.get", {"key": 7})
    assert refused.is_error and refused.structured_content["error"]["code"] == 2002
    assert "2002 ACCESS_DENIED" in text_of(refused)
    assert invalid.is_error and invalid.structured_content["error"]["code"] == 1002


@pytest.mark.anyio
async def test_a_result_json_cannot_carry_is_an_internal_error_not_invalid_json(secure_mesh: SecureMesh) -> None:
    """Invariant: a tool result's text is JSON and its structured content is that JSON.

    MessagePack carries NaN and the infinities, JSON does not: Python's json wrote `NaN`
    (which JSON parsers refuse) while the structured content said `null`. Such a result is
    refused with INTERNAL and a message that says why; the same value's neighbours still read.
    """
    creds = load_credentials(secure_mesh.credentials("dev"))
    with MeshClient(secure_mesh.broker.clients, timeout=10, credentials=creds) as admin:
        admin.call("kv", "put", {"key": "odd", "value": {"x": float("nan"), "y": float("-inf")}})
        admin.call("kv", "put", {"key": "plain", "value": {"x": 1.5}})
    async with stdio_client(bridge_params(secure_mesh)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        odd = await session.call_tool("kv.get", {"key": "odd"})
        plain = await session.call_tool("kv.get", {"key": "plain"})
    assert odd.is_error and odd.structured_content["error"]["code"] == 3003
    assert "NaN or an infinity" in text_of(odd)
    assert not plain.is_error and json.loads(text_of(plain)) == plain.structured_content == {
        "key": "plain", "found": True, "value": {"x": 1.5}}


@pytest.mark.anyio
async def test_a_tool_outside_the_role_is_not_listed_and_cannot_be_called(secure_mesh: SecureMesh) -> None:
    """secret.reveal and kv.delete are registered but the bridge's role may not call them."""
    async with Client(bridge_params(secure_mesh)) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        refused = []
        for name, arguments in (("secret.reveal", {}), ("kv.delete", {"key": "colour"})):
            with pytest.raises(MCPError) as unknown:  # an unlisted tool is a protocol error
                await client.call_tool(name, arguments)
            refused.append(unknown.value)
    assert "secret_reveal" not in names and "kv_delete" not in names
    assert [(e.code, e.data["code"]) for e in refused] == [(types.INVALID_PARAMS, 1003)] * 2


@pytest.mark.anyio
async def test_a_node_joining_mid_session_changes_the_tool_list(secure_mesh: SecureMesh) -> None:
    """A handshake-era session gets notifications/tools/list_changed and can call the new tool."""
    changed = anyio.Event()

    async def on_message(message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with stdio_client(bridge_params(secure_mesh)) as (read, write), ClientSession(
        read, write, message_handler=on_message
    ) as session:
        await session.initialize()
        assert "late_hello" not in {t.name for t in (await session.list_tools()).tools}
        with run_node("mcpnodes:late", secure_mesh.broker, "--credentials", secure_mesh.credentials("late")):
            with anyio.fail_after(10):
                await changed.wait()
            assert "late_hello" in {t.name for t in (await session.list_tools()).tools}
            result = await session.call_tool("late_hello", {"name": "mesh"})
    assert result.structured_content == {"greeting": "hello mesh"}


@pytest.mark.anyio
async def test_a_modern_client_hears_of_new_tools_on_its_listen_stream(secure_mesh: SecureMesh) -> None:
    """The high-level Client (2026-07-28) gets tools_list_changed on subscriptions/listen."""
    async with Client(bridge_params(secure_mesh)) as client:
        async with client.listen(tools_list_changed=True) as sub:
            with run_node("mcpnodes:late", secure_mesh.broker, "--credentials", secure_mesh.credentials("late")):
                with anyio.fail_after(10):
                    event = await sub.__anext__()
                assert type(event).__name__ == "ToolsListChanged"
                result = await client.call_tool("late.hello", {"name": "again"})
    assert result.structured_content == {"greeting": "hello again"}


@pytest.mark.anyio
async def test_a_cancelled_call_cancels_the_mesh_command(secure_mesh: SecureMesh, tmp_path: Path) -> None:
    """Cancelling tools/call makes the node's handler see the cancellation (it writes it to a file)."""
    marker = tmp_path / "marker"
    async with stdio_client(bridge_params(secure_mesh)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.call_tool, "slow.wait", {"seconds": 30, "marker": str(marker)})
            assert await wait_for_file(marker, "started") == "started"
            tg.cancel_scope.cancel()
        assert await wait_for_file(marker, "cancelled") == "cancelled"
        echo = await session.call_tool("echo.echo", {"text": "still here"})
    assert not echo.is_error


@pytest.mark.anyio
async def test_progress_reported_by_the_node_reaches_the_caller(secure_mesh: SecureMesh) -> None:
    """The node's report_progress calls arrive as progress notifications for the call."""
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with stdio_client(bridge_params(secure_mesh)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        result = await session.call_tool("slow.steps", {"count": 3}, progress_callback=on_progress)
    assert result.structured_content == {"steps": 3}
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


def _jsonrpc(id_: int | None, method: str, params: dict[str, object]) -> bytes:
    message: dict[str, object] = {"jsonrpc": "2.0", "method": method, "params": params}
    if id_ is not None:
        message["id"] = id_
    return json.dumps(message).encode() + b"\n"


HANDSHAKE = _jsonrpc(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                       "clientInfo": {"name": "raw", "version": "0"}}) + _jsonrpc(
    None, "notifications/initialized", {})


def _answers(stdout: bytes) -> dict[object, dict[str, object]]:
    """The JSON-RPC responses on the bridge's stdout, by id (nothing else may be written there)."""
    messages = [json.loads(line) for line in stdout.splitlines()]
    return {m["id"]: m for m in messages if "id" in m}


def test_a_message_past_the_line_limit_is_a_parse_error_and_the_session_goes_on(secure_mesh: SecureMesh) -> None:
    """Over a pipe: a 65 MiB line is refused as unparsable, the call after it is answered.

    Invariant: stdout carries only JSON-RPC (every line parses), and the oversized line
    costs the client that message, not the session.
    """
    import subprocess
    import threading

    from mesh.mcp.pipes import MAX_LINE

    params = bridge_params(secure_mesh)
    oversized = b'{"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"pad": "' + b"x" * MAX_LINE + b'"}}\n'
    call = _jsonrpc(3, "tools/call", {"name": "echo_echo", "arguments": {"text": "after"}})
    proc = subprocess.Popen([params.command, *params.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=params.env)
    assert proc.stdin is not None and proc.stdout is not None
    writer = threading.Thread(target=lambda: (proc.stdin.write(HANDSHAKE + oversized + call), proc.stdin.flush()))
    writer.start()
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]  # initialize's answer, then the call's
    finally:
        writer.join(30)
        proc.stdin.close()
        proc.wait(20)
    answers = _answers(b"".join(lines))
    assert answers[3]["result"]["structuredContent"] == {"text": "after"}
    assert 2 not in answers  # nothing could be read of it, its id included


def test_stdin_from_a_regular_file_is_served_too(secure_mesh: SecureMesh, tmp_path: Path) -> None:
    """A file is not a pipe: the bridge reads it with the SDK's own transport, then exits at its end."""
    import subprocess

    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(HANDSHAKE)
    params = bridge_params(secure_mesh)
    with requests.open("rb") as stdin:
        done = subprocess.run([params.command, *params.args], stdin=stdin, capture_output=True, env=params.env,
                              timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert _answers(done.stdout)[1]["result"]["serverInfo"]["name"] == "mesh"
