"""Tool calls answered beside the SDK's session (mesh/mcp/direct.py) answer exactly as the SDK's path.

The invariant: for every request, on every handshake-era protocol revision, the bridge
with its direct path gives the same answer as the same bridge without it (the SDK's own
session path): over HTTP the same status, content type and JSON-RPC body, over stdio
the same lines; the direct path really answers the well-formed calls (counted), and
leaves everything else to the SDK. Both run in this process on one mesh client, over
real sockets and pipes, against a real secure mesh.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import pytest
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from mcpnodes import wait_for_file

from mesh.client import AsyncClient
from mesh.mcp.bridge import Bridge
from mesh.mcp.direct import Call
from mesh.mcp.httpapp import http_app
from mesh.mcp.pipes import line_pipes
from mesh.mcp.serve import MCP_PATH, serve_lines
from mesh.security.credentials import load_credentials

if TYPE_CHECKING:
    from conftest import SecureMesh

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class Served:
    """One bridge in a thread of its own, served twice: with the direct path (`direct`) and without (`sdk`)."""

    def __init__(self, broker: str, credentials: str) -> None:
        self.broker, self.credentials = broker, credentials
        self.urls: dict[str, str] = {}
        self.direct_answers = 0
        self.seen: list[tuple[Any, ...]] = []  # what the server's middleware saw of each tools/call
        self.bridge: Bridge | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sessions: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Served:
        self._thread.start()
        assert self._ready.wait(30), "the bridge did not start"
        if self._failed is not None:
            raise self._failed
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def stdio(self, direct: bool) -> Lines:
        """A new stdio session (a pair of pipes) served with the direct path or only by the SDK."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._stdio(direct), self._loop).result(10)

    async def _stdio(self, direct: bool) -> Lines:
        from mcp.server.stdio import stdio_server

        assert self.bridge is not None
        bridge = self.bridge
        to_server, from_client = os.pipe()
        from_server, to_client = os.pipe()
        lines, writer = await line_pipes(to_server, to_client)

        async def sdk_only() -> None:
            async with stdio_server(lines, writer) as (read, write):  # type: ignore[arg-type]
                await bridge.server.run(read, write, bridge.initialization_options())

        task = asyncio.create_task(serve_lines(bridge, lines, writer) if direct else sdk_only())
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)
        return Lines(from_client, from_server)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as err:  # noqa: BLE001 - any failure to start reaches the test through __enter__
            self._failed = err
            self._ready.set()

    async def _serve(self) -> None:
        import uvicorn

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        client = AsyncClient(self.broker, timeout=10.0, credentials=load_credentials(self.credentials))
        bridge = self.bridge = Bridge(client, timeout=10.0)
        begin = bridge.direct.begin

        def counted(call: Call, session_id: str) -> Any:
            self.direct_answers += 1
            return begin(call, session_id)

        bridge.direct.begin = counted  # type: ignore[method-assign]

        async def recording(ctx: Any, call_next: Any) -> Any:
            if ctx.method == "tools/call":
                self.seen.append((ctx.request_id, ctx.protocol_version, ctx.params, ctx.meta))
            return await call_next(ctx)

        bridge.server.middleware.append(recording)  # after the SDK's OpenTelemetry middleware
        await bridge.start()
        servers = {}
        for name, direct in (("direct", bridge.direct), ("sdk", None)):
            app = http_app(bridge.server, MCP_PATH, "127.0.0.1", direct=direct)
            servers[name] = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                          lifespan="on", access_log=False))
        tasks = [asyncio.create_task(s.serve()) for s in servers.values()]
        while not all(s.started for s in servers.values()):
            await asyncio.sleep(0.02)
        for name, server in servers.items():
            port = server.servers[0].sockets[0].getsockname()[1]
            self.urls[name] = f"http://127.0.0.1:{port}{MCP_PATH}"
        self._ready.set()
        await self._stop.wait()
        for session in list(self._sessions):
            session.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        for server in servers.values():
            server.should_exit = True
        await asyncio.gather(*tasks)
        await bridge.close()
        await client.close()


class Lines:
    """The client's ends of a stdio session: JSON-RPC messages as lines, read with a timeout."""

    def __init__(self, to_server: int, from_server: int) -> None:
        self._out, self._in = to_server, from_server
        self._buf = b""

    def send(self, message: Any) -> None:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        os.write(self._out, body + b"\n")

    def read(self, timeout: float) -> Any:
        """The next message, or None when none comes within `timeout` seconds (or the server closed)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                return None
            chunk = os.read(self._in, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        """End the session as a client does: close its input (the bridge's stdin)."""
        os.close(self._out)

    def answers(self, barrier: str, expect: int, settle: float) -> list[Any]:
        """The messages that come before the answer to a ping `barrier`, and `expect` at least, then `settle` s more."""
        self.send({"jsonrpc": "2.0", "id": barrier, "method": "ping"})
        got, pinged = [], False
        deadline = time.monotonic() + 10
        while not pinged or len(got) < expect:
            message = self.read(max(0.0, deadline - time.monotonic()))
            assert message is not None, f"no answer to {barrier} within 10 s (got {got})"
            if isinstance(message, dict) and message.get("id") == barrier:
                pinged = True
            else:
                got.append(message)
        while (message := self.read(settle)) is not None:
            got.append(message)
        return got


@pytest.fixture(scope="module")
def served(secure_mesh: SecureMesh) -> Iterator[Served]:
    with Served(secure_mesh.broker.clients, secure_mesh.credentials("bridge")) as s:
        yield s


def answer(response: httpx2.Response) -> tuple[int, str, Any]:
    """Status, content type and the answer: JSON-RPC (the last event of a stream), else the text."""
    kind = response.headers.get("content-type", "").split(";")[0]
    if kind == "text/event-stream":
        data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
        body: Any = json.loads(data[-1]) if data else None
    elif kind == "application/json":
        body = response.json() if response.content else None  # 202: accepted, nothing to answer
    else:
        body = response.text  # a refusal before any JSON-RPC (the transport's security checks)
    return response.status_code, kind, body


def open_session(http: httpx2.Client, url: str, version: str, *, initialized: bool = True) -> dict[str, str]:
    """A raw handshake; the headers the session's requests carry."""
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    response = http.post(url, json=init, headers=ACCEPT)
    assert response.status_code == 200, response.text
    headers = {**ACCEPT, "mcp-session-id": response.headers["mcp-session-id"], "mcp-protocol-version": version}
    if initialized:
        done = http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        assert done.status_code == 202
    return headers


def call(name: str, arguments: Any, id_: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": arguments}, **extra}


# (label, body, header changes, whether the direct path answers it: a refusal by a header check is not counted)
CASES: list[tuple[str, Any, dict[str, str | None], bool]] = [
    ("a call", call("echo_echo", {"text": "hi"}), {}, True),
    ("non-ASCII and nesting", call("echo_echo", {"t": "é ✓ 𝄞", "n": [1, 2.5, None, {"a": True}]}), {}, True),
    ("a string id", call("echo_echo", {"text": "x"}, id_="abc"), {}, True),
    ("a numeric string id", call("echo_echo", {"text": "x"}, id_="7"), {}, True),
    ("a large id", call("echo_echo", {"text": "x"}, id_=2**53), {}, True),
    ("an unknown tool", call("no_such_tool", {}), {}, True),
    ("arguments the schema refuses", call("kv_get", {"key": 5}), {}, True),
    ("a mesh error", call("kv_get", {"key": "never-set-direct"}), {}, True),
    ("null arguments", call("echo_echo", None), {}, True),
    ("no arguments", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo_echo"}}, {}, True),
    ("arguments not an object", call("echo_echo", 5), {}, False),
    ("no name", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"arguments": {}}}, {}, False),
    ("no params", {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}, {}, False),
    ("params a list", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": [1]}, {}, False),
    ("a bool id", call("echo_echo", {}, id_=True), {}, False),
    ("a null id", call("echo_echo", {}, id_=None), {}, False),
    ("a float id", call("echo_echo", {}, id_=1.5), {}, False),
    ("jsonrpc 1.0", {**call("echo_echo", {}), "jsonrpc": "1.0"}, {}, False),
    ("a batch", [call("echo_echo", {})], {}, False),
    ("not JSON", b'{"method": "tools/call", ', {}, False),
    ("a progress token", {**call("echo_echo", {"text": "p"}), "params": {"name": "echo_echo", "arguments": {},
                                                                        "_meta": {"progressToken": "t1"}}}, {}, False),
    ("a progress token true", {**call("echo_echo", {}), "params": {"name": "echo_echo", "arguments": {},
                                                                  "_meta": {"progressToken": True}}}, {}, False),
    ("a progress token 1.0, JSON only accepted", {**call("echo_echo", {}), "params": {
        "name": "echo_echo", "arguments": {}, "_meta": {"progressToken": 1.0}}}, {"Accept": "application/json"}, False),
    ("a null progress token", {**call("echo_echo", {}), "params": {"name": "echo_echo", "arguments": {},
                                                                  "_meta": {"progressToken": None}}}, {}, False),
    ("a trace context", {**call("echo_echo", {}), "params": {"name": "echo_echo", "arguments": {}, "_meta": {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}}, {}, True),
    ("no session id", call("echo_echo", {}), {"mcp-session-id": None}, False),
    ("another session's id", call("echo_echo", {}), {"mcp-session-id": "0" * 32}, False),
    ("JSON not accepted", call("echo_echo", {}), {"Accept": "text/event-stream"}, False),
    ("not JSON content", call("echo_echo", {}), {"Content-Type": "text/plain"}, False),
    ("the secret service", call("secret_reveal", {}), {}, True),
    ("an id past 64 bits", call("echo_echo", {"text": "x"}, id_=2**70), {}, True),
    ("arguments nested 5,000 deep", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": '
     b'{"name": "echo_echo", "arguments": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}}", {}, False),
    ("arguments nested 100 deep", call("echo_echo", {"a": json.loads("[" * 100 + "]" * 100)}), {}, True),
]


def post(http: httpx2.Client, url: str, headers: dict[str, str], body: Any, changes: dict[str, str | None]) -> httpx2.Response:
    sent = {k: v for k, v in {**headers, **changes}.items() if v is not None}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(url, content=content, headers=sent)


def wait_until_direct(served: Served, http: httpx2.Client, headers: dict[str, str]) -> None:
    """The bridge learns of a session when its `notifications/initialized` is handled, just after the 202."""
    deadline = time.monotonic() + 10
    before = served.direct_answers
    while served.direct_answers == before:
        assert time.monotonic() < deadline, "the direct path never answered"
        post(http, served.urls["direct"], headers, call("echo_echo", {}), {})


def ready_session(served: Served, http: httpx2.Client, path: str) -> dict[str, str]:
    """A session on the newest revision past its handshake; on the direct path, once that path answers."""
    headers = open_session(http, served.urls[path], HANDSHAKE_PROTOCOL_VERSIONS[-1])
    if path == "direct":
        wait_until_direct(served, http, headers)
    return headers


def start_slow(served: Served, http: httpx2.Client, pool: ThreadPoolExecutor, path: str, headers: dict[str, str],
               marker: Path, seconds: float, id_: int) -> Future[httpx2.Response]:
    """A `slow.wait` call posted on `path`, returned once its node has started it."""
    pending = pool.submit(post, http, served.urls[path], headers,
                          call("slow_wait", {"seconds": seconds, "marker": str(marker)}, id_=id_), {})
    assert asyncio.run(wait_for_file(marker, "started")) == "started"
    return pending


@pytest.mark.parametrize("version", HANDSHAKE_PROTOCOL_VERSIONS)
def test_every_request_is_answered_as_the_sdk_answers_it(served: Served, version: str) -> None:
    """Same status, content type and answer with the direct path and without, on every handshake revision."""
    with httpx2.Client(timeout=30) as http:
        sessions = {name: open_session(http, served.urls[name], version) for name in ("direct", "sdk")}
        wait_until_direct(served, http, sessions["direct"])
        for label, body, changes, direct in CASES:
            before = served.direct_answers
            got = {name: answer(post(http, served.urls[name], sessions[name], body, changes)) for name in sessions}
            assert got["direct"] == got["sdk"], f"{label} ({version})"
            assert served.direct_answers - before == (1 if direct else 0), f"{label} ({version}): direct path taken?"
        assert got["direct"][0] == 200


def test_before_the_handshake_completes_the_sdk_answers(served: Served) -> None:
    """A call on a session whose client has not sent notifications/initialized goes the SDK's way."""
    with httpx2.Client(timeout=30) as http:
        got = {}
        before = served.direct_answers
        for name in ("direct", "sdk"):
            headers = open_session(http, served.urls[name], HANDSHAKE_PROTOCOL_VERSIONS[-1], initialized=False)
            got[name] = answer(post(http, served.urls[name], headers, call("echo_echo", {"text": "early"}), {}))
        assert got["direct"] == got["sdk"]
        assert served.direct_answers == before


def test_concurrent_calls_on_one_session_each_get_their_own_answer(served: Served) -> None:
    """64 calls in flight on one session: every answer carries its own request's id and payload."""
    with httpx2.Client(timeout=30, limits=httpx2.Limits(max_connections=16)) as http:
        headers = ready_session(served, http, "direct")
        before = served.direct_answers

        def one(i: int) -> tuple[int, Any]:
            return i, answer(post(http, served.urls["direct"], headers, call("echo_echo", {"i": i}, id_=i), {}))[2]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(64)))
    for i, body in results:
        assert body["id"] == i
        assert body["result"]["structuredContent"] == {"i": i}
    assert served.direct_answers - before == 64


@pytest.mark.parametrize("path", ["direct", "sdk"])
def test_notifications_cancelled_cancels_the_mesh_command(served: Served, tmp_path: Path, path: str) -> None:
    """A cancelled call's node handler sees the cancellation, and the POST is answered REQUEST_CANCELLED."""
    marker = tmp_path / "marker"
    with httpx2.Client(timeout=30) as http, ThreadPoolExecutor(1) as pool:
        headers = ready_session(served, http, path)
        pending = start_slow(served, http, pool, path, headers, marker, 20, 41)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 41, "reason": "test"}}
        assert post(http, served.urls[path], headers, cancel, {}).status_code == 202
        status, kind, body = answer(pending.result(timeout=15))
        assert asyncio.run(wait_for_file(marker, "cancelled")) == "cancelled"
    assert (status, kind) == (200, "application/json")
    assert body["id"] == 41 and body["error"]["code"] == -32800


@pytest.mark.parametrize("path", ["direct", "sdk"])
def test_a_cancellation_the_transport_refuses_cancels_nothing(served: Served, tmp_path: Path, path: str) -> None:
    """A notifications/cancelled refused for its Content-Type (415) leaves the call running to its answer."""
    marker = tmp_path / "marker"
    with httpx2.Client(timeout=30) as http, ThreadPoolExecutor(1) as pool:
        headers = ready_session(served, http, path)
        pending = start_slow(served, http, pool, path, headers, marker, 1, 42)
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 42}}
        assert post(http, served.urls[path], headers, cancel, {"Content-Type": "text/plain"}).status_code >= 400
        status, _, body = answer(pending.result(timeout=15))
    assert status == 200 and body["result"]["structuredContent"] == {"waited": 1}
    assert marker.read_text() == "finished"


def test_a_session_deleted_mid_call_cancels_it_as_the_sdk_does(served: Served, tmp_path: Path) -> None:
    """DELETE of the session while a call runs: the node sees the cancellation, the POST gets the SDK's answer."""
    got = {}
    for path in ("direct", "sdk"):
        marker = tmp_path / f"marker-{path}"
        with httpx2.Client(timeout=30) as http, ThreadPoolExecutor(1) as pool:
            headers = ready_session(served, http, path)
            pending = start_slow(served, http, pool, path, headers, marker, 20, 43)
            assert http.delete(served.urls[path], headers=headers).status_code == 200
            got[path] = answer(pending.result(timeout=15))
            assert asyncio.run(wait_for_file(marker, "cancelled")) == "cancelled", path
    assert got["direct"] == got["sdk"]
    assert got["direct"][0] == 500


def test_the_servers_middleware_sees_each_call_as_on_the_sdks_path(served: Served) -> None:
    """The server's middleware (the SDK's OpenTelemetry span is one) wraps a direct call with the same context."""
    body = {**call("echo_echo", {"text": "m"}, id_="mw"), "params": {
        "name": "echo_echo", "arguments": {"text": "m"},
        "_meta": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}}
    seen = {}
    with httpx2.Client(timeout=30) as http:
        for name in ("direct", "sdk"):
            headers = ready_session(served, http, name)
            served.seen.clear()
            before = served.direct_answers
            assert post(http, served.urls[name], headers, body, {}).status_code == 200
            assert served.direct_answers - before == (1 if name == "direct" else 0)
            seen[name] = list(served.seen)
    assert len(seen["direct"]) == 1
    assert seen["direct"] == seen["sdk"]


def test_json_nested_past_the_parsers_limit_is_a_parse_error(served: Served) -> None:
    """5,000 levels of nesting: 400 and a JSON-RPC parse error, as the SDK's own app answers, not a 500."""
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo_echo", "arguments": ' + \
        b"[" * 5000 + b"]" * 5000 + b"}}"
    with httpx2.Client(timeout=30) as http:
        headers = open_session(http, served.urls["direct"], HANDSHAKE_PROTOCOL_VERSIONS[-1])
        status, kind, answered = answer(post(http, served.urls["direct"], headers, body, {}))
    assert (status, kind) == (400, "application/json")
    assert answered["error"]["code"] == -32700


CANCELS = {
    "plain": (b'{"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 41}}', True),
    "escaped": (b'{"jsonrpc": "2.0", "method": "notifications\\/cancelled", "params": {"requestId": 41}}', True),
    "error-shaped": (b'{"jsonrpc": "2.0", "id": "zz", "error": {"code": 1, "message": "m"}, '
                     b'"method": "notifications/cancelled", "params": {"requestId": 41}}', False),
}


@pytest.mark.parametrize("variant", CANCELS)
def test_a_cancellation_counts_exactly_when_the_sdk_reads_one(served: Served, tmp_path: Path, variant: str) -> None:
    """JSON escapes decoded, and a body the SDK takes for an error response cancels nothing, on both paths."""
    cancel, cancels = CANCELS[variant]
    got = {}
    for path in ("direct", "sdk"):
        marker = tmp_path / f"marker-{path}"
        with httpx2.Client(timeout=30) as http, ThreadPoolExecutor(1) as pool:
            headers = ready_session(served, http, path)
            pending = start_slow(served, http, pool, path, headers, marker, 1.5, 41)
            assert post(http, served.urls[path], headers, cancel, {}).status_code == 202
            got[path] = answer(pending.result(timeout=15))
        assert asyncio.run(wait_for_file(marker, "cancelled" if cancels else "finished", 10)) == \
            ("cancelled" if cancels else "finished"), path
    assert got["direct"] == got["sdk"]


def open_stdio(served: Served, direct: bool, version: str) -> Lines:
    """A stdio session past its handshake; with the direct path, once it answers calls."""
    lines = served.stdio(direct)
    lines.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}})
    assert lines.read(10)["id"] == 0
    lines.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    if direct:
        deadline = time.monotonic() + 10
        before = served.direct_answers
        while served.direct_answers == before:
            assert time.monotonic() < deadline, "the direct path never answered"
            lines.send(call("echo_echo", {}, id_="warm"))
            assert lines.read(10)["id"] == "warm"
    return lines


STDIO_CASES = [(label, body, direct) for label, body, changes, direct in CASES if not changes] + [
    ("not JSON at all", b"hello", False),
    ("an empty object", {}, False),
]


@pytest.mark.parametrize("version", [HANDSHAKE_PROTOCOL_VERSIONS[0], HANDSHAKE_PROTOCOL_VERSIONS[-1]])
def test_over_stdio_every_line_is_answered_as_the_sdk_answers_it(served: Served, version: str) -> None:
    """The same lines back (in any order) with the direct path and without, on the oldest and newest revisions.

    (The shaping per revision is the HTTP test's, all four: stdio shares it.) The SDK's
    session goes first and says how many answers to wait for; a later extra answer
    on the direct path would show in the settle time after it.
    """
    sessions = {name: open_stdio(served, name == "direct", version) for name in ("sdk", "direct")}
    try:
        for n, (label, body, direct) in enumerate(STDIO_CASES):
            got = {}
            before = served.direct_answers
            for name in ("sdk", "direct"):  # the SDK's first: it says how many answers to wait for
                sessions[name].send(body)
                expect = len(got.get("sdk", []))
                answers = sessions[name].answers(f"b{n}", expect, settle=0.15 if name == "sdk" else 0.05)
                got[name] = sorted(json.dumps(m, sort_keys=True) for m in answers)
            assert got["direct"] == got["sdk"], f"{label} ({version})"
            assert served.direct_answers - before == (1 if direct else 0), f"{label} ({version}): direct path taken?"
    finally:
        for lines in sessions.values():
            lines.close()


@pytest.mark.parametrize("ending", ["cancelled", "cancelled in the same write", "input closed"])
def test_over_stdio_a_call_ends_with_its_cancellation_or_its_session(served: Served, tmp_path: Path, ending: str) -> None:
    """notifications/cancelled (even in the very write that carried the call), or the client closing
    the bridge's input, cancels the mesh command, and the lines that come back are the same on both paths."""
    call_line = call("slow_wait", {"seconds": 20, "marker": "MARKER"}, id_=44)
    cancel_line = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 44}}
    got = {}
    for name in ("sdk", "direct"):
        marker = tmp_path / f"marker-{name}"
        lines = open_stdio(served, name == "direct", HANDSHAKE_PROTOCOL_VERSIONS[-1])
        sent = json.loads(json.dumps(call_line).replace("MARKER", str(marker)))
        if ending == "cancelled in the same write":
            sent["params"]["arguments"]["seconds"] = 1.0  # long enough to start, short enough to finish if not cancelled
            lines.send(json.dumps(sent).encode() + b"\n" + json.dumps(cancel_line).encode())
            time.sleep(2.0)
        else:
            lines.send(sent)
            assert asyncio.run(wait_for_file(marker, "started")) == "started"
            if ending == "cancelled":
                lines.send(cancel_line)
        if ending == "input closed":
            lines.close()
            got[name] = []
            while (message := lines.read(2.0)) is not None:  # until the output goes quiet
                got[name].append(message)
        else:
            got[name] = lines.answers(f"after-{name}", 0, settle=0.3)
            lines.close()
        # Cancelled before the node ran it, the command leaves no marker at all.
        assert asyncio.run(wait_for_file(marker, "cancelled")) in ("cancelled", "<missing>"), name
    assert got["direct"] == got["sdk"]
    if ending == "input closed":
        assert got["sdk"] == [{"jsonrpc": "2.0", "id": 44, "error": {"code": -32000, "message": "Connection closed"}}]
    else:
        assert got["sdk"] == []  # a cancelled request gets no answer


def test_a_call_whose_http_client_goes_away_is_cancelled(served: Served, tmp_path: Path) -> None:
    """A client that gives up on a direct call (its connection closed) cancels the mesh command.

    Beyond the SDK's own path, which lets the command run on for nobody: checked here
    on the direct path only.
    """
    marker = tmp_path / "marker"
    with httpx2.Client(timeout=30) as http:
        headers = ready_session(served, http, "direct")
    body = json.dumps(call("slow_wait", {"seconds": 20, "marker": str(marker)}, id_=45)).encode()
    with httpx2.Client(timeout=httpx2.Timeout(30.0, read=1.0)) as impatient, pytest.raises(httpx2.ReadTimeout):
        impatient.post(served.urls["direct"], content=body, headers=headers)  # gives up after 1 s, closing
    assert asyncio.run(wait_for_file(marker, "cancelled")) == "cancelled"


def _bridge_state(served: Served) -> dict[str, int]:
    """What the bridge holds, read on its own loop: direct calls in flight and stopped, mesh commands awaited, tasks."""
    assert served._loop is not None and served.bridge is not None
    bridge = served.bridge

    async def read() -> dict[str, int]:
        return {"in_flight": len(bridge.direct._in_flight), "stopped": len(bridge.direct._stopped),
                "waiting": len(bridge.client._waiting), "tasks": len(asyncio.all_tasks())}

    return asyncio.run_coroutine_threadsafe(read(), served._loop).result(10)


STORM_OPS = ("echo", "echo", "cancel", "give_up", "delete")


def test_a_storm_of_calls_cancellations_and_departures_leaves_nothing_behind(served: Served, tmp_path: Path) -> None:
    """Invariant: once every call of a storm has ended, the bridge holds nothing for any of them.

    Six HTTP clients and two over stdio at once, each on sessions of its own, take a seeded
    random mix of: plain calls, slow calls cancelled with notifications/cancelled, slow
    calls whose client gives up and closes its connection (HTTP), and sessions deleted or
    whose input is closed in the middle of a slow call. Every
    answer is checked as it comes; afterwards every slow command's node saw it finish or be
    cancelled, and once the storm's sessions are deleted the bridge has no direct call in
    flight or remembered as stopped, its mesh client awaits no command, and its loop runs
    as many tasks as before the storm.
    """
    import random

    slow_slots = threading.Semaphore(3)  # the slow node takes 4 at a time: none waits queued at the broker
    markers: list[Path] = []
    marks = threading.Lock()
    baseline = _bridge_state(served)

    def marker() -> Path:
        with marks:
            path = tmp_path / f"m{len(markers)}"
            markers.append(path)
        return path

    def slow_body(path: Path, id_: int) -> bytes:
        return json.dumps(call("slow_wait", {"seconds": 30, "marker": str(path)}, id_=id_)).encode()

    def client(seed: int) -> list[dict[str, str]]:
        rng = random.Random(seed)
        url = served.urls["direct"]
        sessions = []
        with httpx2.Client(timeout=30) as http, ThreadPoolExecutor(1) as pool:
            headers = ready_session(served, http, "direct")
            sessions.append(headers)
            for n in range(12):
                op, id_ = rng.choice(STORM_OPS), 1000 * seed + n
                if op == "echo":
                    status, _, body = answer(post(http, url, headers, call("echo_echo", {"n": id_}, id_=id_), {}))
                    assert status == 200 and body["result"]["structuredContent"] == {"n": id_}
                    continue
                with slow_slots:
                    path = marker()
                    if op == "give_up":
                        with httpx2.Client(timeout=httpx2.Timeout(30.0, read=0.3)) as impatient, \
                                pytest.raises(httpx2.ReadTimeout):
                            impatient.post(url, content=slow_body(path, id_), headers=headers)
                    elif op == "cancel":
                        pending = start_slow(served, http, pool, "direct", headers, path, 30, id_)
                        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id_}}
                        assert post(http, url, headers, cancel, {}).status_code == 202
                        status, _, body = answer(pending.result(timeout=15))
                        assert status == 200 and body["error"]["code"] == -32800
                    else:  # delete: the session ends under the call; the client goes on with a new one
                        pending = start_slow(served, http, pool, "direct", headers, path, 30, id_)
                        assert http.delete(url, headers=headers).status_code == 200
                        assert answer(pending.result(timeout=15))[0] == 500
                        headers = ready_session(served, http, "direct")
                        sessions.append(headers)
                    assert asyncio.run(wait_for_file(path, "cancelled", timeout=10)) == "cancelled", (op, path)
        return sessions

    def stdio_client(seed: int) -> list[dict[str, str]]:
        rng = random.Random(seed)
        lines = open_stdio(served, True, HANDSHAKE_PROTOCOL_VERSIONS[-1])
        try:
            for n in range(12):
                op, id_ = rng.choice(STORM_OPS), 1000 * seed + n
                if op == "echo":
                    lines.send(call("echo_echo", {"n": id_}, id_=id_))
                    assert lines.read(10)["result"]["structuredContent"] == {"n": id_}
                    continue
                with slow_slots:
                    path = marker()
                    lines.send(json.loads(slow_body(path, id_)))
                    assert asyncio.run(wait_for_file(path, "started")) == "started"
                    if op in ("cancel", "give_up"):
                        lines.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id_}})
                        assert lines.answers(f"b{id_}", 0, settle=0.05) == []  # a cancelled call gets no answer
                    else:  # the client closes the bridge's input under the call, then starts again
                        lines.close()
                        assert lines.read(10)["error"]["message"] == "Connection closed"
                        lines = open_stdio(served, True, HANDSHAKE_PROTOCOL_VERSIONS[-1])
                    assert asyncio.run(wait_for_file(path, "cancelled", timeout=10)) == "cancelled", (op, path)
        finally:
            lines.close()
        return []

    with ThreadPoolExecutor(8) as pool:
        runs = [pool.submit(client, seed) for seed in range(1, 7)] + [pool.submit(stdio_client, seed) for seed in (7, 8)]
        everyone = [s for run in runs for s in run.result()]
    assert len(markers) > 10, "the storm made too few slow calls to mean anything"
    assert [p for p in markers if p.read_text() != "cancelled"] == []
    with httpx2.Client(timeout=30) as http:
        for headers in everyone:
            http.delete(served.urls["direct"], headers=headers)  # those deleted already: 404
    deadline = time.monotonic() + 10
    while True:
        state = _bridge_state(served)
        held = {k: state[k] for k in ("in_flight", "stopped", "waiting")}
        if held == {"in_flight": 0, "stopped": 0, "waiting": 0} and state["tasks"] <= baseline["tasks"]:
            break
        assert time.monotonic() < deadline, f"the bridge still holds {state} (before the storm: {baseline})"
        time.sleep(0.1)
