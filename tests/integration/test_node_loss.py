"""A node that dies or stops mid-command never leaves its callers waiting for their deadline."""

from __future__ import annotations

import json
import signal
import threading
import time

from mesh.client import Client
from mesh.protocol import NodeLostError
from mesh.testing import run_node, spawn


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, outcome


def test_commands_on_a_killed_node_are_node_lost_well_before_their_deadline(tcp_broker):
    """SIGKILL a node running two commands: both callers get NODE_LOST within its liveness window."""
    with Client(tcp_broker.clients, timeout=30) as c, run_node("testnodes:node", tcp_broker, config='{"capacity": 2}') as node:
        calls = [in_background(c.call, "alpha", "work", {"sleep": 20}) for _ in range(2)]
        time.sleep(0.5)
        started = time.monotonic()
        node.signal(signal.SIGKILL)
        for t, _ in calls:
            t.join(10)
        assert time.monotonic() - started < 6
        assert all(isinstance(out[0], NodeLostError) for _, out in calls)
        assert c.call("mesh", "services") == {}


def test_an_idempotent_command_of_a_killed_node_completes_on_another(tcp_broker):
    """The idempotent command a SIGKILLed node was running is run again by the other node."""
    with Client(tcp_broker.clients, timeout=30) as c:
        with run_node("testnodes:node", tcp_broker, config=json.dumps({"name": "first", "capacity": 1})) as first:
            # Long enough that "first" still runs it when killed, however slowly "second"
            # starts on a loaded machine (1 s was not: the command finished on "first").
            t, out = in_background(c.call, "alpha", "idem", {"sleep": 3.0})
            time.sleep(0.3)
            with run_node("testnodes:node", tcp_broker, config=json.dumps({"name": "second", "capacity": 1})):
                first.signal(signal.SIGKILL)
                t.join(20)
        assert out == [{"node": "second"}]


def test_sigterm_with_a_stuck_handler_answers_node_lost_and_exits(tcp_broker):
    """A node told to stop while a handler runs past its drain timeout answers NODE_LOST and exits."""
    with Client(tcp_broker.clients, timeout=60) as c:
        with spawn(
            ["node", "testnodes:node", "--broker", tcp_broker.nodes, "--drain-timeout", "1"]
        ) as node:
            node.wait_for(r"^node \S+ ready ")
            t, out = in_background(c.call, "alpha", "work", {"sleep": 40})
            time.sleep(0.5)
            node.signal(signal.SIGTERM)
            assert node.popen.wait(10) == 0
            t.join(10)
        assert len(out) == 1 and isinstance(out[0], NodeLostError)
