"""Bounded queues push back with a retryable error; a stopping broker drains what it accepted."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh.client import Client
from mesh.protocol import ResourceExhaustedError, UnavailableError
from mesh.testing import run_broker, run_node


def test_a_full_queue_is_resource_exhausted_and_retries_get_through():
    """Beyond capacity plus queue the broker answers RESOURCE_EXHAUSTED; with retries every call succeeds."""
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--queue-limit", "2") as b:
        with run_node("testnodes:node", b, config='{"capacity": 1}'):
            with Client(b.clients, timeout=20) as c, ThreadPoolExecutor(8) as pool:
                def once(_: int) -> str:
                    try:
                        c.call("alpha", "work", {"sleep": 0.2}, retries=0)
                        return "ok"
                    except ResourceExhaustedError as err:
                        assert err.retryable and err.details["queue_limit"] == 2
                        return "exhausted"

                outcomes = list(pool.map(once, range(8)))
                assert outcomes.count("exhausted") >= 4 and outcomes.count("ok") >= 3
                patient = list(pool.map(lambda _: c.call("alpha", "work", {"sleep": 0.05}, retries=30), range(8)))
                assert len(patient) == 8 and all(r["node"] == "t" for r in patient)


def test_sigterm_drains_in_flight_commands_and_refuses_new_ones():
    """After SIGTERM the broker finishes the commands it accepted, refuses new ones, then exits 0."""
    with run_broker() as b, run_node("testnodes:node", b):
        with Client(b.clients, timeout=10) as c:
            results: list[object] = []
            slow = threading.Thread(target=lambda: results.append(c.call("alpha", "work", {"sleep": 1.0})))
            slow.start()
            time.sleep(0.3)
            b.process.signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(UnavailableError):
                c.call("alpha", "whoami", {}, retries=0)
            slow.join(10)
            assert results == [{"node": "t", "max_concurrent": 1}]
            assert b.process.popen.wait(10) == 0
