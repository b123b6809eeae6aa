"""A node with an admitted key, speaking raw ZeroMQ, against a real secure broker process.

What it sends at `mesh.register` is answered with its code while the link stays up;
what libzmq itself cuts (past MAXMSGSIZE) costs only that link, which comes back; and
however much the nodes register, `Client.services()` reads the whole registry.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from mesh.client import Client
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_REGISTRATION_BYTES,
    MAX_SCHEMA_BYTES,
    ErrorCode,
    Header,
    MessageTooLargeError,
    MessageType,
    command,
    decode_header,
    encode_header,
    encode_payload,
)
from mesh.security.credentials import load_credentials
from mesh.security.state import ensure_state
from mesh.testing import BrokerProcess, run_broker

# The broker's message limit here: 4 MiB, so that a 3 MB schema reaches the registry,
# while libzmq cuts a link carrying more than twice that (mesh/sockets.py).
LIMIT = 4 * MAX_MESSAGE_BYTES
BIG_NODES = 6
ACTIONS = MAX_REGISTRATION_BYTES // MAX_SCHEMA_BYTES - 1  # as many near-limit schemas as one registration holds
GUARD_MS = 10_000  # only a guard against a hang: every wait below ends on an event
MESH = str(Path(sys.executable).parent / "mesh")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Path]]:
    """A broker with security on; nodes `raw` (service kv) and big0.. (service bigN)."""
    state = tmp_path_factory.mktemp("limits") / "state"
    nodes = {"raw": ["kv"], **{f"big{i}": [f"big{i}"] for i in range(BIG_NODES)}}
    ensure_state(state, nodes=nodes, clients={"dev": ["admin"]}, now=time.time())
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(state),
                    "--max-message-bytes", str(LIMIT)) as b:
        yield b, state


class RawNode:
    """A CURVE DEALER holding a node's admitted key, sending hand-made `mesh.*` commands."""

    def __init__(self, broker: BrokerProcess, state: Path, name: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        load_credentials(state / "credentials" / f"{name}.toml").secure(self.sock)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(broker.nodes)
        self.links = 0  # handshakes seen so far

    def send(self, action: str, payload: Any) -> Header:
        header = command("mesh", action, now=time.time())
        self.sock.send_multipart([b"", encode_header(header), encode_payload(payload)], copy=False)
        return header

    def ask(self, action: str, payload: Any = None) -> Header:
        """Send `mesh.<action>` and return the header of its answer."""
        sent = self.send(action, payload)
        while True:
            assert self.sock.poll(GUARD_MS), f"no answer to mesh.{action}"
            reply = decode_header(self.sock.recv_multipart()[1])
            if reply.correlation_id == sent.id:
                return reply

    def next_event(self) -> int:
        """The next link event (a handshake or a disconnect), counting handshakes."""
        assert self.monitor.poll(GUARD_MS), "no link event"
        event = recv_monitor_message(self.monitor)["event"]
        self.links += event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        return event

    def pending_events(self) -> list[int]:
        events = []
        while self.monitor.poll(0):
            events.append(self.next_event())
        return events

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(secure: tuple[BrokerProcess, Path]) -> Iterator[RawNode]:
    node = RawNode(*secure, "raw")
    yield node
    node.close()


def kv_get(schema: Any) -> dict[str, Any]:
    return {"name": "raw", "capacity": 1, "heartbeat_interval": 60,
            "services": {"kv": {"actions": {"get": {"description": "d", "schema": schema}}}}}


CYCLE = {"$ref": "#/definitions/a", "definitions": {"a": {"$ref": "#/definitions/b"}, "b": {"$ref": "#/definitions/a"}}}
GET = "services.kv.actions.get"


def test_each_malformed_registration_is_answered_on_a_link_that_stays_up(raw: RawNode) -> None:
    """Invariant: every malformed registration below libzmq's limit is answered with its code, link kept."""
    non_string_keys = kv_get({})
    non_string_keys["services"][1] = {"actions": {"a": {}}}
    cases = [
        (non_string_keys, ErrorCode.VALIDATION_FAILED, "services.1"),
        (kv_get(CYCLE), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.definitions.a.$ref"),
        (kv_get({"type": 12}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.type"),
        (kv_get({"description": "x" * 3_000_000}), ErrorCode.MESSAGE_TOO_LARGE, "payload"),  # the total limit first
        (kv_get({"description": "x" * MAX_SCHEMA_BYTES}), ErrorCode.MESSAGE_TOO_LARGE, f"{GET}.schema"),
    ]
    for payload, code, field in cases:
        reply = raw.ask("register", payload)
        assert reply.type is MessageType.ERROR and reply.error is not None, field
        assert (reply.error.code, reply.error.details["field"]) == (code, field), reply.error.message
    assert raw.ask("register", kv_get({"type": "object"})).type is MessageType.RESPONSE
    assert raw.ask("unregister", {}).type is MessageType.RESPONSE
    assert zmq.EVENT_DISCONNECTED not in raw.pending_events() and raw.links == 1


def test_a_registration_past_libzmq_limit_costs_only_its_link(raw: RawNode) -> None:
    """Invariant: a 10 MB registration is cut by libzmq (never read), the link comes back and is served."""
    assert raw.next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
    raw.send("register", kv_get({"description": "x" * 10_000_000}))
    assert raw.next_event() == zmq.EVENT_DISCONNECTED
    assert raw.next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED  # the DEALER reconnects by itself
    assert raw.ask("register", kv_get({})).type is MessageType.RESPONSE
    assert raw.ask("unregister", {}).type is MessageType.RESPONSE


def test_the_whole_registry_is_read_however_much_the_nodes_register(secure: tuple[BrokerProcess, Path]) -> None:
    """Invariant: `Client.services()` and `mesh services` return every action when the registry
    is several times a client's message limit; the one-answer form says MESSAGE_TOO_LARGE."""
    broker, state = secure
    nodes = [RawNode(broker, state, f"big{i}") for i in range(BIG_NODES)]
    try:
        for i, node in enumerate(nodes):
            actions = {f"a{k}": {"schema": {"type": "object", "description": f"{i}.{k}" + "x" * (MAX_SCHEMA_BYTES - 64)}}
                       for k in range(ACTIONS)}
            registration = {"name": f"big{i}", "capacity": 1, "heartbeat_interval": 60,
                            "services": {f"big{i}": {"actions": actions}}}
            assert node.ask("register", registration).type is MessageType.RESPONSE
        with Client(broker.clients, timeout=10, credentials=load_credentials(state / "credentials/dev.toml")) as dev:
            registry = dev.services()
            with pytest.raises(MessageTooLargeError):
                dev.call("mesh", "services")
        assert len(encode_payload(registry)) > 2 * MAX_MESSAGE_BYTES
        assert {s: len(e["actions"]) for s, e in registry.items()} == {f"big{i}": ACTIONS for i in range(BIG_NODES)}
        assert registry["big5"]["actions"]["a3"]["schema"]["description"].startswith("5.3x")
        printed = subprocess.run(
            [MESH, "services", "--broker", broker.clients, "--credentials", str(state / "credentials/dev.toml")],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        assert json.loads(printed) == registry
    finally:
        for node in nodes:
            node.close()
