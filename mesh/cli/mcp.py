"""`mesh mcp`: the MCP bridge, over stdio or streamable HTTP (docs/mcp.md)."""

from __future__ import annotations

from pathlib import Path

import click

from ..process import tune_for_serving
from ..protocol import AuthenticationFailedError, MeshError
from .base import (
    ADMIN_CLIENT,
    ADMIN_CREDENTIALS,
    BRIDGE_CLIENT,
    BRIDGE_CREDENTIALS,
    BROKER_HELP,
    DEFAULT_BROKER,
    UsageError,
    _explained,
    _fail,
    _need_extra,
    _recorded,
    _setup_logging,
    log_format_option,
    main,
)


@main.command("mcp")
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--credentials", type=click.Path(dir_okay=False), default=None,
              help=f"Security on: the bridge's credentials (default: MESH_CREDENTIALS, else {BRIDGE_CREDENTIALS} or {ADMIN_CREDENTIALS}, the first that exists, when var/mesh records the broker).")
@click.option("--include", multiple=True, metavar="GLOB", help="Expose only tools whose name (service.action) matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Never expose tools whose name matches (repeatable; beats --include).")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds one tool call may take.")
@click.option("--http", "http_address", default=None, metavar="HOST:PORT", help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False, exists=True), help="With --http: the bearer token clients must send (required off loopback).")
@click.option("--tls-cert", default=None, type=click.Path(dir_okay=False), help="With --http: serve HTTPS (TLS 1.3 minimum) with this certificate (PEM, the chain after it). Needs --tls-key.")
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="With --http: the certificate's private key (PEM, unencrypted).")
@click.option("--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
@log_format_option
def mcp(broker_ep: str, credentials: str | None, include: tuple[str, ...], exclude: tuple[str, ...], timeout: float,
        http_address: str | None, token_file: str | None, tls_cert: str | None, tls_key: str | None,
        log_level: str, log_format: str) -> None:
    """Run the MCP bridge: every service action the bridge may call, as a tool for AI clients (docs/mcp.md)."""
    import asyncio

    _need_extra("mcp", "mcp", "mcp")

    from ..client import AsyncClient
    from ..mcp.bridge import Bridge
    from ..mcp.serve import serve_http, serve_stdio
    from ..mcp.tools import Selection
    from ..monitor.server import tls_context
    from ..security.credentials import find_credentials, load_credentials

    _setup_logging(log_level, log_format)  # stderr: on stdio, stdout carries the protocol
    if (token_file is not None or tls_cert is not None or tls_key is not None) and http_address is None:
        raise UsageError("--token-file, --tls-cert and --tls-key go with --http")
    try:
        tls = tls_context(tls_cert, tls_key)
    except MeshError as err:
        _fail(err)
    host, port = _host_port(http_address) if http_address is not None else ("", 0)
    token = None
    if token_file is not None:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise UsageError(f"{token_file} is empty")

    found = find_credentials(credentials, names=(BRIDGE_CLIENT, ADMIN_CLIENT), brokers=_recorded(broker_ep))

    async def run() -> None:
        creds = load_credentials(found.path) if found.path is not None else None
        client = AsyncClient(broker_ep, timeout=timeout, credentials=creds)
        bridge = Bridge(client, selection=Selection(include, exclude), timeout=timeout)
        if http_address is None:
            await serve_stdio(bridge)
        else:
            await serve_http(bridge, host, port, token, tls=tls,
                             ready=lambda url: click.echo(f"mcp bridge ready url={url} tools={len(bridge.tools)}"))

    tune_for_serving()  # after the SDK's imports: its objects leave the collector's way
    try:
        asyncio.run(run())
    except AuthenticationFailedError as err:
        _fail(_explained(err, found, (BRIDGE_CLIENT, ADMIN_CLIENT)))
    except MeshError as err:
        _fail(err)
    except KeyboardInterrupt:
        pass


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--http must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
