"""Three `mesh broker` processes as one cluster: exactly-once commands through any broker,
a broker restarted from its data directory, and one that refuses a corrupted directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh.client import Client
from mesh.cluster.member import STATE_FILE
from mesh.launcher import BROKER_READY
from mesh.protocol import decode_header, decode_payload, encode_command_header, encode_payload, new_id
from mesh.testing import BrokerProcess, MeshProcess, free_ports, run_node

NAMES = ("b1", "b2", "b3")


@dataclass
class Cluster:
    root: Path
    peers: dict[str, str]
    monitors: dict[str, int]
    brokers: dict[str, BrokerProcess]

    def args(self, name: str) -> list[str]:
        members = [f"--member={n}={ep}" for n, ep in self.peers.items()]
        return [
            "broker", "--name", name, "--clients", "tcp://127.0.0.1:*", "--nodes", "tcp://127.0.0.1:*",
            "--events", "tcp://127.0.0.1:*", *members, "--data", str(self.root / name),
            "--monitor", f"127.0.0.1:{self.monitors[name]}",
        ]  # fmt: skip

    def start(self, name: str, clients: str | None = None, nodes: str | None = None) -> BrokerProcess:
        args = self.args(name)
        if clients is not None and nodes is not None:  # a restart keeps its endpoints
            args[args.index("--clients") + 1], args[args.index("--nodes") + 1] = clients, nodes
        proc = MeshProcess(args)
        m = proc.wait_for(BROKER_READY.pattern)
        self.brokers[name] = BrokerProcess(proc, name, m.group("clients"), m.group("nodes"), m.group("events"))
        return self.brokers[name]

    def status(self, name: str) -> dict[str, Any]:
        """The broker's /cluster (its monitor answers 503 until its first snapshot)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.monitors[name]}/cluster", timeout=5) as resp:
                    return json.load(resp)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def leader(self, timeout: float = 15.0) -> str:
        """The leader all running brokers agree on (waits for one)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = set()
            for name, b in self.brokers.items():
                if b.process.popen.poll() is None:
                    seen.add(self.status(name)["leader"])
            if len(seen) == 1 and None not in seen:
                return seen.pop()
            assert time.monotonic() < deadline, f"no agreed leader: {seen}"
            time.sleep(0.1)

    def node_endpoints(self) -> str:
        return ",".join(self.brokers[n].nodes for n in NAMES)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    ports = free_ports(6)
    c = Cluster(
        tmp_path,
        {n: f"tcp://127.0.0.1:{p}" for n, p in zip(NAMES, ports[:3], strict=True)},
        dict(zip(NAMES, ports[3:], strict=True)),
        {},
    )
    try:
        for name in NAMES:
            c.start(name)
        c.leader()
        yield c
    finally:
        for b in c.brokers.values():
            b.process.stop()


@contextmanager
def kv_node(cluster: Cluster) -> Iterator[MeshProcess]:
    config = json.dumps({"path": str(cluster.root / "kv.sqlite3")})
    with run_node("kv", cluster.node_endpoints(), config=config) as node:
        for name in NAMES:  # registered with every broker before the test starts
            deadline = time.monotonic() + 10
            while True:
                with Client(cluster.brokers[name].clients, timeout=5.0) as c:
                    if "incr" in c.call("mesh", "services").get("kv", {}).get("actions", {}):
                        break
                assert time.monotonic() < deadline, f"{name} never saw kv"
                time.sleep(0.1)
        yield node


def send_raw(ctx: zmq.Context, endpoint: str, cid: str, payload: Any) -> Any:
    """One kv.incr with a chosen id, as a client resending after a failover would."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        now = time.time()
        sock.send_multipart([encode_command_header("kv", "incr", id=cid, now=now, deadline=now + 10), encode_payload(payload)])
        assert sock.poll(10_000), f"no answer from {endpoint}"
        header, body = sock.recv_multipart()
        assert decode_header(header).correlation_id == cid
        return decode_payload(body)
    finally:
        sock.close(linger=0)


def kv_value(broker: BrokerProcess, key: str) -> Any:
    with Client(broker.clients, timeout=10.0) as c:
        return c.call("kv", "get", {"key": key})["value"]


def test_exactly_once_through_each_broker_and_a_resend_elsewhere_runs_nothing_again(cluster: Cluster) -> None:
    """kv.incr runs through leader and followers alike; the same id sent to another broker
    gets the committed outcome and the counter does not move."""
    ctx = zmq.Context()
    try:
        with kv_node(cluster):
            for i, name in enumerate(NAMES, start=1):
                with Client(cluster.brokers[name].clients, timeout=10.0) as c:
                    assert c.call("kv", "incr", {"key": "n", "by": 1}) == {"key": "n", "value": i}
            cid = new_id()
            first = send_raw(ctx, cluster.brokers["b1"].clients, cid, {"key": "n", "by": 10})
            assert first == {"key": "n", "value": 13}
            for name in ("b2", "b3", "b1"):
                assert send_raw(ctx, cluster.brokers[name].clients, cid, {"key": "n", "by": 10}) == first
            assert kv_value(cluster.brokers["b2"], "n") == 13
    finally:
        ctx.term()


def test_a_killed_broker_restarts_from_its_data_directory_and_catches_up(cluster: Cluster) -> None:
    """SIGKILL a follower; the others go on; restarted on its data, it catches up and knows
    the outcomes committed while it was down."""
    ctx = zmq.Context()
    try:
        with kv_node(cluster):
            leader = cluster.leader()
            victim = next(n for n in NAMES if n != leader)
            old = cluster.brokers[victim]
            old.process.popen.kill()
            old.process.popen.wait(10)
            cid = new_id()
            answer = send_raw(ctx, cluster.brokers[leader].clients, cid, {"key": "k", "by": 5})
            assert answer == {"key": "k", "value": 5}
            ports = cluster.brokers[victim]
            back = cluster.start(victim, ports.clients, ports.nodes)
            want = cluster.status(leader)["commit_index"]
            deadline = time.monotonic() + 15
            while cluster.status(victim)["commit_index"] < want:
                assert time.monotonic() < deadline, "the restarted broker never caught up"
                time.sleep(0.1)
            assert cluster.leader() == leader
            # The node reconnects to it by itself; then a resend through it replays the outcome.
            deadline = time.monotonic() + 15
            while True:
                with Client(back.clients, timeout=5.0) as c:
                    if "kv" in c.call("mesh", "services"):
                        break
                assert time.monotonic() < deadline, "the node never came back to the restarted broker"
                time.sleep(0.2)
            assert send_raw(ctx, back.clients, cid, {"key": "k", "by": 5}) == answer
            assert kv_value(back, "k") == 5
    finally:
        ctx.term()


def test_a_corrupted_data_directory_refuses_to_start(cluster: Cluster) -> None:
    """A broker whose log fails its checksums exits with CORRUPT_STATE naming the file."""
    victim = next(n for n in NAMES if n != cluster.leader())
    with Client(cluster.brokers[cluster.leader()].clients, timeout=10.0) as c:
        c.call("mesh", "ping")
    cluster.brokers[victim].process.stop()
    state = cluster.root / victim / STATE_FILE
    with sqlite3.connect(state) as db:
        assert db.execute("UPDATE entries SET data = x'c0ffee' WHERE idx = 1").rowcount == 1
    done = subprocess.run(
        [sys.executable, "-m", "mesh", *cluster.args(victim)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "3007" in done.stderr and "CorruptStateError" in done.stderr and str(state) in done.stderr
    assert "ready" not in done.stdout


def test_events_reach_every_broker_numbered_alike_and_survive_a_restart(cluster: Cluster) -> None:
    """An event published through one broker reaches subscribers of every broker with the
    same sequence number; a broker SIGKILLed and restarted from its data replays them."""
    leader = cluster.leader()
    follower = next(n for n in NAMES if n != leader)
    clients = {n: Client(cluster.brokers[n].clients, timeout=10.0) for n in NAMES}
    try:
        subs = {n: clients[n].subscribe("orders") for n in NAMES}
        seqs = [clients[NAMES[i % 3]].publish("orders.new", {"n": i}) for i in range(6)]
        assert seqs == [1, 2, 3, 4, 5, 6]  # one numbering, whichever broker took the event
        for name, sub in subs.items():
            got = [sub.get(timeout=10) for _ in range(6)]
            assert [(e.seq, e.payload) for e in got] == [(i + 1, {"n": i}) for i in range(6)], name
            sub.close()
        clients[follower].close()
        old = cluster.brokers[follower]
        old.process.popen.kill()
        old.process.popen.wait(10)
        assert clients[leader].publish("orders.new", {"n": 6}) == 7  # a majority is still up
        back = cluster.start(follower, old.clients, old.nodes)
        with Client(back.clients, timeout=10.0) as c, c.subscribe("orders", from_seq=0) as sub:
            got = [sub.get(timeout=10) for _ in range(7)]
            assert [(e.seq, e.payload) for e in got] == [(i + 1, {"n": i}) for i in range(7)]
            assert c.publish("orders.new", {"n": 7}) == 8
    finally:
        for c in clients.values():
            c.close()
