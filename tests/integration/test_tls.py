"""TLS for the HTTP endpoints: the MCP bridge (`mesh mcp --http --tls-cert/--tls-key`) and the
broker's monitor (`--monitor-tls-cert/--monitor-tls-key`), with a self-signed certificate
made here, real sockets and real handshakes."""

from __future__ import annotations

import http.client
import secrets
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mesh.monitor.server import MonitorServer, monitor_settings
from mesh.testing import self_signed_certificate, spawn

if TYPE_CHECKING:
    from conftest import SecureMesh


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def client_context(cert: str, *, tls12_only: bool = False) -> ssl.SSLContext:
    """A client that trusts `cert`; limited to TLS 1.2 at most when asked."""
    context = ssl.create_default_context(cafile=cert)
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def handshake(host: str, port: int, context: ssl.SSLContext) -> str:
    """Connect and complete a TLS handshake; the version agreed (raises if refused)."""
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return str(tls.version())


def host_port(url: str) -> tuple[str, int]:
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    host, port = netloc.rsplit(":", 1)
    return host, int(port)


# ------------------------------------------------------------------ the monitor

@pytest.fixture
def https_monitor(certificate: tuple[str, str]) -> Iterator[MonitorServer]:
    cert, key = certificate
    server = MonitorServer(monitor_settings("127.0.0.1:0", tls_cert=cert, tls_key=key))
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_the_monitor_serves_https_to_a_tls13_client(https_monitor: MonitorServer, certificate: tuple[str, str]) -> None:
    """With a certificate the monitor's URL is https and a TLS 1.3 client gets its answers."""
    assert https_monitor.url.startswith("https://")
    host, port = host_port(https_monitor.url)
    assert handshake(host, port, client_context(certificate[0])) == "TLSv1.3"
    conn = http.client.HTTPSConnection(host, port, context=client_context(certificate[0]), timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 503  # no snapshot published: not live, but answered over TLS


def test_the_monitor_refuses_a_tls12_only_client(https_monitor: MonitorServer, certificate: tuple[str, str]) -> None:
    """TLS 1.3 is the minimum: a client that stops at TLS 1.2 fails its handshake."""
    host, port = host_port(https_monitor.url)
    with pytest.raises(ssl.SSLError):
        handshake(host, port, client_context(certificate[0], tls12_only=True))


def test_mesh_broker_names_the_missing_monitor_key(certificate: tuple[str, str], tmp_path: Path) -> None:
    """`mesh broker --monitor-tls-key` pointing nowhere stops the start with the option and path named."""
    missing = tmp_path / "nowhere.pem"
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "broker", "--clients", "tcp://127.0.0.1:0", "--nodes", "tcp://127.0.0.1:0",
         "--events", "tcp://127.0.0.1:0", "--monitor", "127.0.0.1:0", "--monitor-tls-cert", certificate[0],
         "--monitor-tls-key", str(missing)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"--monitor-tls-key: cannot read {missing}" in result.stderr


# ------------------------------------------------------------- the MCP bridge

@pytest.fixture(scope="module")
def https_bridge(secure_mesh: SecureMesh, certificate: tuple[str, str],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`mesh mcp --http` over TLS with a token; its URL and token."""
    token = secrets.token_urlsafe(24)
    token_file = tmp_path_factory.mktemp("mcp-tls") / "token"
    token_file.write_text(token + "\n")
    cert, key = certificate
    with spawn(["mcp", "--broker", secure_mesh.broker.clients, "--credentials", secure_mesh.credentials("bridge"),
                "--http", "127.0.0.1:0", "--token-file", str(token_file), "--tls-cert", cert, "--tls-key", key]) as proc:
        yield proc.wait_for(r"mcp bridge ready url=(\S+)").group(1), token


@pytest.mark.anyio
async def test_the_bridge_serves_mcp_over_tls13(https_bridge: tuple[str, str], certificate: tuple[str, str]) -> None:
    """The SDK's client over HTTPS (TLS 1.3) lists the tools and calls echo."""
    url, token = https_bridge
    assert url.startswith("https://")
    assert handshake(*host_port(url), client_context(certificate[0])) == "TLSv1.3"
    async with httpx2.AsyncClient(verify=client_context(certificate[0]),
                                  headers={"Authorization": f"Bearer {token}"}) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            echo = await client.call_tool("echo_echo", {"text": "over tls"})
    assert "echo_echo" in names and echo.structured_content == {"text": "over tls"}


def test_the_bridge_refuses_a_tls12_only_client(https_bridge: tuple[str, str], certificate: tuple[str, str]) -> None:
    """A client limited to TLS 1.2 never gets to HTTP: the handshake fails."""
    with pytest.raises(ssl.SSLError):
        handshake(*host_port(https_bridge[0]), client_context(certificate[0], tls12_only=True))


def test_mesh_mcp_refuses_a_key_that_is_not_the_certificates(secure_mesh: SecureMesh, certificate: tuple[str, str],
                                                            tmp_path: Path) -> None:
    """A key of another certificate is refused at the start, naming both files."""
    _, other_key = self_signed_certificate(tmp_path)  # another certificate's key
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "mcp", "--broker", secure_mesh.broker.clients, "--credentials",
         secure_mesh.credentials("bridge"), "--http", "127.0.0.1:0", "--tls-cert", certificate[0], "--tls-key", other_key],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "not a PEM certificate and its unencrypted key" in result.stderr and other_key in result.stderr


@pytest.mark.anyio
async def test_a_page_served_over_https_from_loopback_may_call_the_bridge(
        https_bridge: tuple[str, str], certificate: tuple[str, str]) -> None:
    """DNS-rebinding protection stays on, and admits the https origin of loopback (not another site)."""
    url, token = https_bridge
    origin = url.removesuffix("/mcp")
    request = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "page", "version": "0"}}}
    statuses = []
    async with httpx2.AsyncClient(verify=client_context(certificate[0])) as http:
        for page in (origin, "https://evil.example"):
            response = await http.post(url, json=request, headers={
                "Authorization": f"Bearer {token}", "Origin": page, "Accept": "application/json, text/event-stream"})
            statuses.append(response.status_code)
    assert statuses == [200, 403]
