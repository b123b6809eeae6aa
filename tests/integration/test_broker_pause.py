"""A broker paused (SIGSTOP) longer than its nodes' liveness window keeps them on resume.

Invariants: after SIGCONT the broker declares no heartbeating node dead for its own pause
(it gives each a whole liveness window from the resume), and a node killed during the
pause is still declared dead once that window has passed (docs/operations.md, "A paused
broker").
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
from clusterup import eventually

from mesh.client import Client
from mesh.testing import run_node

INTERVAL = "0.5"  # a liveness window of 1.5 s, as in topologies/cluster.toml
PAUSE_S = 4.0  # longer than the window
LATE_S = 0.3  # the survivor resumes this long after the broker: within its window, after the first tick


def stats(client: Client) -> dict[str, Any]:
    return client.call("mesh", "stats", {})


@pytest.mark.timeout(90)
def test_a_resumed_broker_keeps_its_heartbeating_nodes_and_loses_a_killed_one(tcp_broker) -> None:
    """SIGSTOP the broker for 4 s (window 1.5 s), SIGKILL one of its two nodes meanwhile,
    SIGCONT: exactly one node is declared dead (the killed one), after the grace.

    The survivor is paused with the broker and resumed 0.3 s after it, so that the broker's
    first ticks after the resume cannot have read a heartbeat of it: only the grace keeps it.
    """
    broker = tcp_broker.process
    with (
        run_node("echo", tcp_broker, "--heartbeat-interval", INTERVAL) as survivor,
        run_node("echo", tcp_broker, "--heartbeat-interval", INTERVAL) as victim,
        Client(tcp_broker.clients, timeout=10) as client,
    ):
        eventually(lambda: stats(client)["nodes"] == 2, 20, "both nodes registered")
        broker.signal(signal.SIGSTOP)
        survivor.signal(signal.SIGSTOP)
        try:
            victim.signal(signal.SIGKILL)
            victim.popen.wait(10)
            time.sleep(PAUSE_S)
        finally:
            broker.signal(signal.SIGCONT)
            time.sleep(LATE_S)
            survivor.signal(signal.SIGCONT)
        after = eventually(
            lambda: (s := stats(client))["counters"].get("nodes_expired", 0) >= 1 and s, 20, "the killed node declared dead"
        )
        assert after["counters"]["self_pauses"] >= 1
        # The survivor kept its registration through the pause and the grace after it.
        time.sleep(2 * float(INTERVAL) * 3)
        final = stats(client)
        assert final["counters"]["nodes_expired"] == 1, final["counters"]
        assert final["nodes"] == 1
        assert client.call("echo", "echo", {"text": "still here"}) == {"text": "still here"}
