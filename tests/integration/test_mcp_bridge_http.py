"""The MCP bridge over streamable HTTP with a bearer token, driven by the MCP SDK's clients."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from mcpnodes import CLASH_NAMES, wait_for_file
from test_mcp_bridge_stdio import bridge_params

from mesh.testing import MeshProcess, run_node, spawn

if TYPE_CHECKING:
    from conftest import SecureMesh

PORTABLE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # the rule Claude's and OpenAI's tool APIs enforce


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class HttpBridge:
    def __init__(self, url: str, token: str, process: MeshProcess) -> None:
        self.url = url
        self.token = token
        self.process = process

    def http(self, token: str | None = "") -> httpx2.AsyncClient:
        """An HTTP client sending `token` (the bridge's by default, none for None)."""
        token = self.token if token == "" else token
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))

    async def rpc(self, method: str, params: dict[str, object], **headers: str) -> dict[str, object]:
        """One raw JSON-RPC request; the response whether it comes as JSON or as an SSE event."""
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        async with self.http() as http:
            response = await http.post(self.url, json=request,
                                       headers={"Accept": "application/json, text/event-stream", **headers})
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("application/json"):
            return response.json()
        data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])

    @asynccontextmanager
    async def session(self, **kwargs: object) -> AsyncIterator[ClientSession]:
        """A handshake-era ClientSession over streamable HTTP, initialized."""
        async with self.http() as http, streamable_http_client(self.url, http_client=http) as (read, write):
            async with ClientSession(read, write, **kwargs) as session:  # type: ignore[arg-type]
                await session.initialize()
                yield session


@pytest.fixture(scope="module")
def bridge(secure_mesh: SecureMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpBridge]:
    """`mesh mcp --http` on a free loopback port, with a token file."""
    token = secrets.token_urlsafe(24)
    token_file = tmp_path_factory.mktemp("mcp-http") / "token"
    token_file.write_text(token + "\n")
    with spawn(["mcp", "--broker", secure_mesh.broker.clients, "--credentials", secure_mesh.credentials("bridge"),
                "--timeout", "10", "--http", "127.0.0.1:0", "--token-file", str(token_file)]) as proc:
        url = proc.wait_for(r"mcp bridge ready url=(\S+)").group(1)
        yield HttpBridge(url, token, proc)



@pytest.mark.anyio
async def test_without_the_bearer_token_every_request_is_refused_401(bridge: HttpBridge) -> None:
    """No token, or the wrong one, is answered 401 before any MCP processing."""
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo.echo", "arguments": {"text": "x"}}}
    headers = {"Accept": "application/json, text/event-stream"}
    for token in (None, "not-the-token"):
        async with bridge.http(token) as http:
            response = await http.post(bridge.url, json=call, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.anyio
async def test_the_sdk_client_without_a_token_cannot_connect(bridge: HttpBridge) -> None:
    """The SDK's own client fails to connect without the token: the server's refusal, out of its task groups."""
    with pytest.raises(ExceptionGroup) as info:
        async with bridge.http(None) as http:
            async with Client(streamable_http_client(bridge.url, http_client=http)) as client:
                await client.call_tool("echo.echo", {"text": "x"})
    assert info.group_contains(MCPError)


@pytest.mark.anyio
async def test_tools_calls_and_errors_over_http(bridge: HttpBridge) -> None:
    """With the token: tools listed with schemas, echo/kv/sqlite calls succeed, a mesh error is isError."""
    async with bridge.session() as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        echo = await session.call_tool("echo.echo", {"text": "over http"})
        await session.call_tool("kv.put", {"key": "k", "value": [1, 2]})
        got = await session.call_tool("kv.get", {"key": "k"})
        rows = await session.call_tool("sqlite.query", {"sql": "SELECT colour FROM fruit WHERE name = 'apple'"})
        refused = await session.call_tool("sqlite.query", {"sql": "DROP TABLE fruit"})
    assert tools["echo_echo"].input_schema["type"] == "object" and "kv_delete" not in tools
    assert all(PORTABLE.fullmatch(name) for name in tools) and set(CLASH_NAMES) <= {t.title for t in tools.values()}
    assert echo.structured_content == {"text": "over http"}
    assert got.structured_content["value"] == [1, 2]
    assert rows.structured_content["rows"] == [{"colour": "red"}]
    assert refused.is_error and refused.structured_content["error"]["code"] == 2002


@pytest.mark.anyio
async def test_a_tool_outside_the_role_cannot_be_called_over_http(bridge: HttpBridge) -> None:
    """The high-level Client over HTTP neither sees nor reaches secret.reveal (a protocol error)."""
    async with bridge.http() as http, Client(streamable_http_client(bridge.url, http_client=http)) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        with pytest.raises(MCPError) as refused:
            await client.call_tool("secret.reveal", {})
    assert "secret_reveal" not in names
    assert refused.value.code == types.INVALID_PARAMS and refused.value.data["code"] == 1003


@pytest.mark.anyio
async def test_new_tools_are_announced_to_http_sessions_both_ways(bridge: HttpBridge, secure_mesh: SecureMesh) -> None:
    """A session gets tools/list_changed and a modern client its listen event; the new tool works."""
    changed = anyio.Event()

    async def on_message(message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with bridge.session(message_handler=on_message) as session:
        async with bridge.http() as http, Client(streamable_http_client(bridge.url, http_client=http)) as client:
            async with client.listen(tools_list_changed=True) as sub:
                with run_node("mcpnodes:late", secure_mesh.broker, "--credentials", secure_mesh.credentials("late")):
                    with anyio.fail_after(10):
                        event = await sub.__anext__()
                        await changed.wait()
                    assert type(event).__name__ == "ToolsListChanged"
                    modern = await client.call_tool("late.hello", {"name": "http"})
                    legacy = await session.call_tool("late.hello", {"name": "session"})
    assert modern.structured_content == {"greeting": "hello http"}
    assert legacy.structured_content == {"greeting": "hello session"}


@pytest.mark.anyio
async def test_a_cancelled_http_call_cancels_the_mesh_command(bridge: HttpBridge, tmp_path: Path) -> None:
    """Cancelling tools/call over HTTP makes the node's handler see the cancellation."""
    marker = tmp_path / "marker"
    async with bridge.session() as session:
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.call_tool, "slow.wait", {"seconds": 30, "marker": str(marker)})
            assert await wait_for_file(marker, "started") == "started"
            tg.cancel_scope.cancel()
        assert await wait_for_file(marker, "cancelled") == "cancelled"


def test_listening_beyond_loopback_needs_a_token(secure_mesh: SecureMesh) -> None:
    """`mesh mcp --http 0.0.0.0:PORT` without --token-file refuses to start."""
    with spawn(["mcp", "--broker", secure_mesh.broker.clients, "--credentials", secure_mesh.credentials("bridge"),
                "--http", "0.0.0.0:0"]) as proc:
        proc.wait_for("needs a bearer token", timeout=20)
        assert proc.popen.wait(20) != 0


def initialize_params(version: str) -> dict[str, object]:
    return {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "parity", "version": "0"}}


async def stdio_initialize(mesh: SecureMesh, version: str) -> dict[str, object]:
    """A raw `initialize` at `version` to a fresh stdio bridge; its JSON-RPC response."""
    params = bridge_params(mesh)
    async with await anyio.open_process([params.command, *params.args], env=params.env) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        request = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": initialize_params(version)}
        await proc.stdin.send(json.dumps(request).encode() + b"\n")
        buffer = b""
        with anyio.fail_after(30):
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive()
        await proc.stdin.aclose()
        with anyio.fail_after(20):  # the bridge leaves once its client closes stdin
            await proc.wait()
    return json.loads(buffer.split(b"\n")[0])


@pytest.mark.anyio
@pytest.mark.parametrize("version", HANDSHAKE_PROTOCOL_VERSIONS)
async def test_initialize_advertises_the_same_capabilities_over_http_and_stdio(
    bridge: HttpBridge, secure_mesh: SecureMesh, version: str
) -> None:
    """For each handshake revision: the same capabilities over both transports, list changes announced."""
    over_http = await bridge.rpc("initialize", initialize_params(version))
    over_stdio = await stdio_initialize(secure_mesh, version)
    assert over_http["result"]["protocolVersion"] == over_stdio["result"]["protocolVersion"] == version
    capabilities = over_http["result"]["capabilities"]
    assert capabilities == over_stdio["result"]["capabilities"]
    assert capabilities["tools"]["listChanged"] is True and capabilities["resources"]["listChanged"] is True


@pytest.mark.anyio
@pytest.mark.parametrize("version", MODERN_PROTOCOL_VERSIONS)
async def test_discover_advertises_the_same_capabilities_over_http_and_stdio(
    bridge: HttpBridge, secure_mesh: SecureMesh, version: str
) -> None:
    """For each per-request revision (server/discover): the same capabilities over both transports."""
    async with bridge.http() as http, Client(streamable_http_client(bridge.url, http_client=http)) as client:
        over_http = (client.protocol_version, client.server_capabilities)
    async with Client(bridge_params(secure_mesh)) as client:
        over_stdio = (client.protocol_version, client.server_capabilities)
    assert over_http == over_stdio and over_http[0] == version
    assert over_http[1].tools.list_changed and over_http[1].resources.list_changed


@asynccontextmanager
async def both_transports(bridge: HttpBridge, mesh: SecureMesh) -> AsyncIterator[list[Client]]:
    """A high-level SDK client of the HTTP bridge and one of a fresh stdio bridge."""
    async with bridge.http() as http, Client(streamable_http_client(bridge.url, http_client=http)) as over_http:
        async with Client(bridge_params(mesh)) as over_stdio:
            yield [over_http, over_stdio]


@pytest.mark.anyio
async def test_the_service_template_is_listed_and_reads_one_service_over_both_transports(
    bridge: HttpBridge, secure_mesh: SecureMesh
) -> None:
    """resources/templates/list gives mesh://services/{service}; the expanded URI reads that service."""
    async with both_transports(bridge, secure_mesh) as clients:
        for client in clients:
            templates = (await client.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["mesh://services/{service}"]
            uri = templates[0].uri_template.replace("{service}", "kv")
            kv = json.loads((await client.read_resource(uri)).contents[0].text)
            assert kv["actions"]["get"]["schema"]["required"] == ["key"]


@pytest.mark.anyio
async def test_an_unknown_tool_is_a_json_rpc_error_over_both_transports(
    bridge: HttpBridge, secure_mesh: SecureMesh
) -> None:
    """tools/call of a tool never listed is answered with JSON-RPC -32602, not a result with isError.

    The error's data is the mesh error (code 1003, HANDLER_NOT_FOUND), so the mesh code still crosses.
    """
    async with both_transports(bridge, secure_mesh) as clients:
        for client in clients:
            with pytest.raises(MCPError) as unknown:
                await client.call_tool("no.such-tool", {})
            assert unknown.value.code == -32602 and "no.such-tool" in unknown.value.message
            assert unknown.value.data["code"] == 1003 and unknown.value.data["name"] == "HANDLER_NOT_FOUND"
    async with bridge.session() as session:  # the handshake era too
        with pytest.raises(MCPError) as unknown:
            await session.call_tool("no.such-tool", {})
    assert unknown.value.code == -32602 and unknown.value.data["code"] == 1003


@pytest.mark.anyio
async def test_progress_comes_as_an_event_stream_and_every_other_answer_as_one_json_body(bridge: HttpBridge) -> None:
    """Invariant: a call that gave a progress token gets every report, then its result, as an
    event stream; any other request gets one JSON body holding its own result (never a
    notification in its place, although the node reports progress all the same)."""
    accept = {"Accept": "application/json, text/event-stream"}

    def call(id_: int, meta: dict[str, object] | None = None) -> dict[str, object]:
        params: dict[str, object] = {"name": "slow.steps", "arguments": {"count": 3}}
        if meta is not None:
            params["_meta"] = meta
        return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}

    async with bridge.http() as http:
        opened = await http.post(bridge.url, headers=accept, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        session = {**accept, "Mcp-Session-Id": opened.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-06-18"}
        await http.post(bridge.url, headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        plain = await http.post(bridge.url, headers=session, json=call(2))
        streamed = await http.post(bridge.url, headers=session, json=call(3, {"progressToken": "p"}))
    assert opened.headers["content-type"].startswith("application/json")
    assert plain.headers["content-type"].startswith("application/json")
    assert plain.json()["id"] == 2 and plain.json()["result"]["structuredContent"] == {"steps": 3}
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
    events = [e for e in events if e]  # a priming event carries no message
    assert [e["params"]["progress"] for e in events[:-1]] == [1, 2, 3]
    assert {e["params"]["progressToken"] for e in events[:-1]} == {"p"}
    assert events[-1]["id"] == 3 and events[-1]["result"]["structuredContent"] == {"steps": 3}


@pytest.mark.anyio
async def test_progress_reaches_an_sdk_client_over_http(bridge: HttpBridge) -> None:
    """The SDK client's progress callback sees every report of a call over HTTP, in order,
    while calls without a callback in flight on the same session get their own results."""
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with bridge.session() as session:
        async with anyio.create_task_group() as tg:
            echoes: list[object] = []

            async def echo(i: int) -> None:
                echoes.append((await session.call_tool("echo.echo", {"text": f"e{i}"})).structured_content)

            for i in range(8):
                tg.start_soon(echo, i)
            result = await session.call_tool("slow.steps", {"count": 3}, progress_callback=on_progress)
    assert result.structured_content == {"steps": 3}
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    assert sorted(e["text"] for e in echoes) == [f"e{i}" for i in range(8)]  # type: ignore[index]
