"""A node of a cluster serves every broker: it registers with each, answers on the link a
command came in on, and runs a command once whichever brokers it comes through."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from mesh.client import Client
from mesh.protocol import decode_header, decode_payload, encode_command_header, encode_payload, new_id
from mesh.testing import BrokerProcess, run_broker, run_node


@pytest.fixture
def two_brokers() -> Iterator[tuple[BrokerProcess, BrokerProcess]]:
    with run_broker() as first, run_broker() as second:
        yield first, second


def services_of(broker: BrokerProcess) -> dict:
    with Client(broker.clients, timeout=5.0) as c:
        return c.call("mesh", "services")


def test_a_node_given_two_brokers_registers_with_both_and_serves_through_each(two_brokers):
    """`mesh node --broker A,B`: both brokers list its service and route to it."""
    first, second = two_brokers
    with run_node("testnodes:node", f"{first.nodes},{second.nodes}") as node:
        assert "broker=" + first.nodes + "," + second.nodes in node.wait_for(r"node t ready .*").group(0)
        for broker in (first, second):
            deadline = time.monotonic() + 10
            while "alpha" not in services_of(broker):
                assert time.monotonic() < deadline, f"broker {broker.name} never saw the node"
                time.sleep(0.1)
            with Client(broker.clients, timeout=10.0) as c:
                assert c.call("alpha", "whoami", {}) == {"node": "t"}


def test_the_same_command_through_two_brokers_runs_once(two_brokers):
    """A resend of a running command through the other broker gets the first run's reply."""
    first, second = two_brokers
    ctx = zmq.Context()
    socks = []
    try:
        with run_node("testnodes:node", f"{first.nodes},{second.nodes}"):
            for broker in (first, second):
                with Client(broker.clients, timeout=10.0) as c:  # ready on both before the race
                    assert c.call("alpha", "whoami", {}) == {"node": "t"}
            for broker in (first, second):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.connect(broker.clients)
                socks.append(sock)
            cid = new_id()
            frames = [encode_command_header("alpha", "tally", id=cid, now=time.time(), deadline=time.time() + 10),
                      encode_payload({"sleep": 0.5})]
            socks[0].send_multipart(frames)
            time.sleep(0.1)
            socks[1].send_multipart(frames)
            replies = []
            for sock in socks:
                assert sock.poll(10_000), "no reply"
                header, payload = sock.recv_multipart()
                assert decode_header(header).correlation_id == cid
                replies.append(decode_payload(payload))
            assert replies == [{"node": "t", "runs": 1}, {"node": "t", "runs": 1}]
            with Client(second.clients, timeout=10.0) as c:
                assert c.call("alpha", "tally", {}) == {"node": "t", "runs": 2}
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def test_a_node_keeps_serving_through_the_other_broker_when_one_dies(two_brokers):
    """SIGKILL of one broker: a client with both brokers fails over and the node answers it."""
    first, second = two_brokers
    with run_node("testnodes:node", f"{first.nodes},{second.nodes}"):
        with Client([first.clients, second.clients], timeout=15.0) as c:
            assert c.call("alpha", "whoami", {}) == {"node": "t"}
            deadline = time.monotonic() + 10
            while "alpha" not in services_of(second):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            first.process.popen.kill()
            assert c.call("alpha", "idem", {}) == {"node": "t"}
            assert c.broker == second.clients
