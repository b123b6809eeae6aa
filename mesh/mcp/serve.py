"""The bridge's transports: stdio for desktop clients, streamable HTTP for the rest.

Rules of this module:

* stdout belongs to the protocol on stdio: logs go to stderr (the CLI sets that up).
* Over HTTP, a bearer token guards the endpoint. It is required when the bridge listens
  beyond loopback (`serve_http` refuses to start without one) and checked whenever one
  is given; a request without it, or with another, is answered 401 before the MCP SDK
  sees it. Tokens are compared in constant time and never logged.
* With a certificate and key the endpoint is HTTPS, TLS 1.3 minimum (the context comes
  from `tls_context`, shared with the monitor); a TLS 1.2 client fails its handshake.
* The mesh client is opened before serving (an unreachable broker or a refused role
  fails the start, not the first call) and closed after.
"""

from __future__ import annotations

import hmac
import signal
import ssl
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import anyio

from ..monitor.server import is_loopback  # the same rule as the monitor's token
from ..protocol import ConfigurationError
from .bridge import Bridge
from .httpapp import http_app
from .pipes import pipe_streams

__all__ = ["serve_stdio", "serve_http", "BearerGuard", "MCP_PATH"]

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
            stdin, stdout = pipes if pipes is not None else (None, None)
            async with stdio_server(stdin, stdout) as (read, write):  # type: ignore[arg-type]
                await bridge.server.run(read, write, bridge.initialization_options())
    finally:
        await _close(bridge)


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
