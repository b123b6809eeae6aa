"""The monitor of a real broker under a slow-HTTP attack: 1,000 stalled sockets and 100 that reset.

What holds (issue 15, "every port holds against hostile and broken peers"): the broker
grows no thread per connection, `/healthz` answers and commands are routed while the
sockets are open, every stalled socket is closed by the server (408 after the header
timeout, or 503 at the connection cap), nothing leaves a traceback, and each of these
peers is counted in `/metrics`.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mesh.client import Client
from mesh.monitor.server import MonitorLimits
from mesh.testing import free_ports, run_broker, run_node

SLOW = 1000  # sockets that send half a request line and stall
RESETTING = 100  # sockets that send a whole request and reset at once
LIMITS = MonitorLimits()  # what `mesh broker --monitor` runs with
SETTLE_S = LIMITS.header_timeout_s + 15.0  # generous: every slow socket is closed well before this


def threads(pid: int) -> int:
    """The broker process's thread count, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def get(base: str, path: str) -> tuple[int, bytes]:
    """One GET on a fresh connection (10 s client timeout), for checks while the attack runs."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def stall(port: int) -> tuple[socket.socket, float]:
    """A socket that sent half a request line and nothing more, with the time it did."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /varz HT")
    return s, time.monotonic()


def reset_after_request(port: int) -> None:
    """Send a whole request for the biggest page and reset the connection (SO_LINGER 0) at once."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(b"GET /snapshot HTTP/1.1\r\nHost: x\r\n\r\n")
    s.close()


def farewell(s: socket.socket, deadline: float) -> tuple[int | None, float]:
    """The status the server sent before closing `s` (None: closed without one) and when it closed."""
    data = b""
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise AssertionError(f"the server kept a stalled socket open past {SETTLE_S} s") from None
        if not chunk:
            closed = time.monotonic()
            s.close()
            return (int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None), closed
        data += chunk


def test_a_thousand_stalled_sockets_cost_no_threads_and_are_each_closed_and_counted():
    """Slow sockets pin no thread and block neither /healthz nor commands; each gets 408 (after the
    header timeout) or 503 (at the cap) and is closed; resets are counted; no traceback is logged."""
    port = free_ports()[0]
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--monitor", f"127.0.0.1:{port}") as broker:
        base = broker.process.wait_for(r"monitor (http://\S+)").group(1)
        with run_node("echo", broker):
            assert get(base, "/healthz")[0] == 200
            before = threads(broker.process.pid)
            for _ in range(RESETTING):
                reset_after_request(port)
            stalled = [stall(port) for _ in range(SLOW)]
            try:
                during = threads(broker.process.pid)
                time.sleep(LIMITS.evict_after_s)  # the stalled sockets are now old enough to give way
                status, body = get(base, "/healthz")
                assert status == 200 and json.loads(body)["live"] is True
                client = Client(broker.clients, timeout=10.0)
                try:
                    assert client.call("echo", "echo", {"under": "attack"}) == {"under": "attack"}
                finally:
                    client.close()
                assert during <= before, f"{during - before} threads more with {SLOW} slow sockets open"
                deadline = time.monotonic() + SETTLE_S
                ends = [(farewell(s, deadline), sent) for s, sent in stalled]
            finally:
                for s, _ in stalled:
                    s.close()
            timed_out = [(closed - sent) for (status, closed), sent in ends if status == 408]
            # Refused at the cap: 503, or a reset when so many are refused at once that the server
            # no longer waits for each to read its answer (LINGER_S, at most max_connections at a time).
            refused = [status for (status, _), _ in ends if status in (503, None)]
            assert len(timed_out) + len(refused) == SLOW, sorted({status for (status, _), _ in ends})
            assert timed_out and min(timed_out) >= LIMITS.header_timeout_s
            assert len(refused) >= SLOW - LIMITS.max_connections
            status, text = get(base, "/metrics")
            assert status == 200
            families = {f.name: f for f in text_string_to_metric_families(text.decode())}
            counted = {s.labels["kind"]: s.value for s in families["mesh_monitor_connection_errors"].samples}
            assert counted["timeout"] == len(timed_out)
            assert counted["refused"] == len(refused)
            assert counted["reset"] >= 1
        output = broker.process.output()
    assert "Traceback" not in output
    assert sum("mesh.monitor" in line for line in output.splitlines()) <= 1  # one warning a minute at most
