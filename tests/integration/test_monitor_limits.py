"""The monitor's limits on real sockets: bad heads, bodies, slow readers, the connection cap, quiet logs.

Each test runs a `MonitorServer` in this process (its own thread, as in a broker) with short
limits, publishes a real snapshot of a broker core, and talks to it over loopback TCP.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator

import pytest

from mesh.broker import Broker
from mesh.monitor.server import MonitorLimits, MonitorServer, MonitorSettings
from mesh.monitor.snapshot import Monitor

TOKEN = "t0ken-that-must-never-be-logged"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
SHORT = MonitorLimits(max_connections=2, header_timeout_s=0.5, body_timeout_s=0.5, write_timeout_s=0.5, evict_after_s=60.0)


def serve(limits: MonitorLimits, **extra: object) -> MonitorServer:
    """A started monitor on a free loopback port requiring TOKEN, with a snapshot of an empty broker."""
    server = MonitorServer(MonitorSettings("127.0.0.1", 0, TOKEN), limits=limits)
    server.publish({**Monitor("b1", time.time()).snapshot(Broker(), time.time()), **extra})
    server.start()
    return server


@pytest.fixture
def monitor() -> Iterator[MonitorServer]:
    server = serve(SHORT)
    yield server
    server.close()


def connect(server: MonitorServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends on `s` until it closes the connection (10 s at most between bytes)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `data`, in order."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        found.append((int(head.split()[1]), rest[:length]))
        data = rest[length:]
    return found


def wait_open(server: MonitorServer, count: int) -> None:
    """Wait until the server holds `count` connections (its accept loop has caught up)."""
    while len(server.connections.open) != count:
        time.sleep(0.01)


def test_bad_requests_get_their_status_and_one_quiet_log_line_without_the_token(monitor, caplog):
    """Each malformed request is answered with its status and a JSON hint, then closed; each is counted;
    the log has no traceback, no token, and one warning for all of them."""
    caplog.set_level(logging.DEBUG, logger="mesh.monitor")
    bad = {
        b"GET /varz HTTP/1.1\r\n" + AUTH + b"".join(b"X-%d: v\r\n" % i for i in range(70)) + b"\r\n": 431,
        b"GET /varz HTTP/1.1\r\n" + AUTH + b"X-Big: " + b"v" * 20_000 + b"\r\n\r\n": 431,
        b"GET /varz HTTP/1.1 extra\r\n" + AUTH + b"\r\n": 400,
        b"GET /varz HTTP/3.0\r\n" + AUTH + b"\r\n": 505,
        b"DELETE /varz HTTP/1.1\r\n" + AUTH + b"\r\n": 501,
        b"GET /varz HTTP/1.1\r\n" + AUTH + b"Content-Length: 999999999\r\n\r\n": 413,
    }
    for request, status in bad.items():
        s = connect(monitor)
        s.sendall(request)
        [(got, body)] = responses(until_closed(s))
        assert got == status and json.loads(body)["hint"], request[:40]
    assert monitor.connections.errors["bad_request"] == len(bad)
    assert not any(r.exc_info for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_one_connection_carries_pipelined_requests_and_a_body_is_read_and_dropped(monitor):
    """Keep-alive and pipelining work; a body announced by Content-Length is skipped, not parsed as a request;
    an HTTP/1.0 request ends the connection; the token is still required."""
    s = connect(monitor)
    s.sendall(b"GET /healthz HTTP/1.1\r\n" + AUTH + b"Content-Length: 14\r\n\r\nGET /nosuch\r\n\r"
              b"GET /varz HTTP/1.1\r\n\r\n"
              b"GET /varz HTTP/1.0\r\n" + AUTH + b"\r\n")
    [(health, body), (unauthorised, _), (varz, _)] = responses(until_closed(s))
    assert (health, unauthorised, varz) == (200, 401, 200) and json.loads(body)["live"] is True
    assert sum(monitor.connections.errors.values()) == 0


def test_an_idle_keep_alive_connection_is_closed_quietly_after_the_header_timeout(monitor):
    """A connection that was served and then sends nothing is closed without a 408 and is not counted."""
    s = connect(monitor)
    s.sendall(b"GET /healthz HTTP/1.1\r\n" + AUTH + b"\r\n")
    [(status, _)] = responses(until_closed(s))
    assert status == 200 and sum(monitor.connections.errors.values()) == 0


def test_a_stalled_body_gets_408_after_the_body_timeout(monitor):
    """A body that stops arriving is answered 408 and the connection closed; counted as a timeout."""
    s = connect(monitor)
    s.sendall(b"GET /healthz HTTP/1.1\r\n" + AUTH + b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\nabc")
    data = until_closed(s)
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert [status for status, _ in responses(data.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))] == [408]
    assert monitor.connections.errors["timeout"] == 1


def test_a_peer_that_never_reads_its_response_is_cut_off_after_the_write_timeout():
    """The server does not wait on a reader that stopped reading: after write_timeout_s it drops the connection."""
    server = serve(SHORT, blob="x" * 20_000_000)  # far more than socket buffers hold
    try:
        s = connect(server)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /snapshot HTTP/1.1\r\n" + AUTH + b"\r\n")
        wait_open(server, 1)
        wait_open(server, 0)  # gone without the test reading a byte
        assert server.connections.errors["timeout"] == 1
        s.close()
    finally:
        server.close()


def test_at_the_cap_a_newcomer_is_refused_with_503_unless_a_connection_has_waited_long_enough():
    """With every place taken by connections that have not waited evict_after_s, a newcomer gets 503;
    once they have, the newcomer takes the longest-waiting one's place, which gets 503, and is served."""
    strict = serve(SHORT)
    try:
        stalled = [connect(strict) for _ in range(2)]
        wait_open(strict, 2)
        s = connect(strict)
        s.sendall(b"GET /healthz HTTP/1.1\r\n" + AUTH + b"\r\n")
        [(status, body)] = responses(until_closed(s))
        assert status == 503 and "retry" in json.loads(body)["hint"]
        assert strict.connections.errors["refused"] == 1
        for old in stalled:
            old.close()
    finally:
        strict.close()
    yielding = serve(MonitorLimits(max_connections=2, header_timeout_s=30.0, evict_after_s=0.0))
    try:
        first, second = connect(yielding), connect(yielding)
        first.sendall(b"GET /hea")
        wait_open(yielding, 2)
        s = connect(yielding)
        s.sendall(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n" + AUTH + b"\r\n")
        assert [status for status, _ in responses(until_closed(s))] == [200]
        assert [status for status, _ in responses(until_closed(first))] == [503]
        assert len(yielding.connections.open) == 1 and yielding.connections.errors["refused"] == 1
    finally:
        yielding.close()
    assert until_closed(second) == b""  # close() ends every connection still open


def test_the_monitor_listens_on_ipv6_loopback():
    """`[::1]:PORT` binds an IPv6 socket and is served like any other address."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = MonitorServer(MonitorSettings("::1", 0))
    server.publish(Monitor("b1", time.time()).snapshot(Broker(), time.time()))
    server.start()
    try:
        assert server.url.startswith("http://[::1]:")
        port = int(server.url.rpartition(":")[2])
        with socket.create_connection(("::1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert [status for status, _ in responses(until_closed(s))] == [200]
    finally:
        server.close()
