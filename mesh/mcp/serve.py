"""The bridge's transports: stdio for desktop clients, streamable HTTP for the rest.

Rules of this module:

* stdout belongs to the protocol on stdio: logs go to stderr (the CLI sets that up).
* Over HTTP, a bearer token guards the endpoint. It is required when the bridge listens
  beyond loopback (`serve_http` refuses to start without one) and checked whenever one
  is given; a request without it, or with another, is answered 401 before the MCP SDK
  sees it. Tokens are compared in constant time and never logged.
* With a certificate and key the endpoint is HTTPS, TLS 1.3 minimum (the context comes
  from `tls_context`, shared with the monitor); a TLS 1.2 client fails its handshake.
* Over stdio (pipes) and over HTTP, a tool call without progress on a session past its
  handshake is answered beside the SDK's session, not through it (`direct.py`).
* The mesh client is opened before serving (an unreachable broker or a refused role
  fails the start, not the first call) and closed after.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import signal
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, Final

import anyio
from mcp_types import CONNECTION_CLOSED, ErrorData

from ..monitor.server import is_loopback  # the same rule as the monitor's token
from ..protocol import ConfigurationError
from .bridge import Bridge
from .direct import BY_CLIENT, ENDED, STDIO_SESSION, Answer, Call, DirectCalls, Stopped, error_answer
from .httpapp import http_app
from .pipes import LineReader, LineWriter, pipe_streams

__all__ = ["serve_stdio", "serve_lines", "serve_http", "BearerGuard", "DirectLines", "MCP_PATH"]

log = logging.getLogger("mesh.mcp")
_SESSIONS = itertools.count(1)

MCP_PATH: Final = "/mcp"
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class BearerGuard:
    """ASGI middleware: HTTP requests must carry `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b'Bearer realm="mesh"')]})
                await send({"type": "http.response.body", "body": b'{"error": "a bearer token is required"}'})
                return
        await self.app(scope, receive, send)


async def serve_stdio(bridge: Bridge) -> None:
    """Serve one MCP client over this process's stdin and stdout until it closes them."""
    from mcp.server.stdio import stdio_server

    await bridge.start()
    try:
        async with pipe_streams() as pipes:
            if pipes is not None:
                await serve_lines(bridge, *pipes)
            else:  # a terminal or a file: the SDK's own threads, every call through its session
                async with stdio_server() as (read, write):
                    await bridge.server.run(read, write, bridge.initialization_options())
    finally:
        await _close(bridge)


async def serve_lines(bridge: Bridge, lines: LineReader, writer: LineWriter) -> None:
    """One MCP session over these line streams, the bridge's direct calls answered beside the SDK's session."""
    from mcp.server.stdio import stdio_server

    direct = DirectLines(lines, writer, bridge.direct)
    session = STDIO_SESSION.set(direct.key)  # the bridge's handlers learn the session's key from it
    try:
        async with stdio_server(direct, writer) as (read, write):  # type: ignore[arg-type]
            await bridge.server.run(read, write, bridge.initialization_options())
    finally:
        await direct.close()
        STDIO_SESSION.reset(session)


class DirectLines:
    """The client's lines for the SDK's stdio transport, less the tool calls the bridge answers itself.

    A line `DirectCalls.take`s is in flight at once and answered in a task of its own,
    its answer written as one line, as the SDK writes its own (`direct.py` says which
    calls and why); every other line goes on to the SDK, a `notifications/cancelled`
    after it cancelled the direct call it names. At the end of input the session is
    over: its direct calls are cancelled and answered `CONNECTION_CLOSED`, as the SDK's
    dispatcher answers its unfinished requests.
    """

    def __init__(self, lines: LineReader, writer: LineWriter, direct: DirectCalls) -> None:
        self._lines, self._writer, self._direct = lines, writer, direct
        self._tasks: set[asyncio.Task[None]] = set()
        self.key = f"stdio-{next(_SESSIONS)}"  # this session's in `direct` (HTTP ids are uuid4 hex)

    def __aiter__(self) -> DirectLines:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                self._direct.end(self.key)
                raise
            call = self._direct.take(line, self.key)
            if call is None:
                self._direct.cancel(line, self.key)
                return line
            task = asyncio.get_running_loop().create_task(self._answer(call, self._direct.begin(call, self.key)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, call: Call, pending: Coroutine[Any, Any, Answer]) -> None:
        answer = await pending
        if answer is BY_CLIENT:  # the SDK answers nothing to a request the client cancelled
            return
        if answer is ENDED:  # input closed first: the SDK's dispatcher answers this at its shutdown
            answer = error_answer(call, ErrorData(code=CONNECTION_CLOSED, message="Connection closed"))
        assert not isinstance(answer, Stopped)
        try:
            await self._writer.write(answer.model_dump_json(by_alias=True, exclude_unset=True) + "\n")
            await self._writer.flush()
        except (ConnectionError, RuntimeError) as err:  # the client closed its end: nobody to answer
            log.debug("could not answer tools/call %s: %s", call.params.name, err)

    async def close(self) -> None:
        """Cancel the direct calls still running (the session is over) and wait for their last lines."""
        self._direct.end(self.key)
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def serve_http(bridge: Bridge, host: str, port: int, token: str | None, *,
                     tls: ssl.SSLContext | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Serve MCP clients over streamable HTTP at http(s)://HOST:PORT/mcp until cancelled.

    Args:
        bridge: the bridge to serve.
        host, port: where to listen (port 0: any free port).
        token: the bearer token clients must send; required beyond loopback.
        tls: HTTPS with this context (`tls_context`: TLS 1.3 minimum); None: plain HTTP.
        ready: called with the URL once the server listens.

    Raises:
        ConfigurationError: no token for a non-loopback address.
    """
    import uvicorn

    if token is None and not is_loopback(host):
        raise ConfigurationError(f"listening on {host} needs a bearer token (--token-file)", details={"host": host})
    app: Any = http_app(bridge.server, MCP_PATH, host, https=tls is not None, direct=bridge.direct)
    if token is not None:
        app = BearerGuard(app, token)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", access_log=False,
                            ssl_context_factory=None if tls is None else lambda _config, _default: tls)
    server = uvicorn.Server(config)
    _stop_on_signals(server)
    await bridge.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            while not server.started:
                if server.should_exit:
                    break
                await anyio.sleep(0.02)
            if server.started and ready is not None:
                bound = server.servers[0].sockets[0].getsockname()
                shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
                ready(f"{'http' if tls is None else 'https'}://{shown}:{bound[1]}{MCP_PATH}")
    finally:
        await _close(bridge)


def _stop_on_signals(server: Any) -> None:
    """SIGTERM and SIGINT stop the HTTP server, and the bridge then closes its mesh client.

    uvicorn handles both signals while it serves and raises them again when it is done;
    with the default handlers in place that would kill the process before the bridge
    closes, so these handlers stay installed and only ask the server to exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: Any) -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


async def _close(bridge: Bridge) -> None:
    with anyio.CancelScope(shield=True):
        await bridge.close()
        await bridge.client.close()
