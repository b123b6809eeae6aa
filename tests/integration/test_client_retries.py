"""The client SDK retries retryable errors with the same command id, and only those."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from mesh.client import Client
from mesh.protocol import (
    AccessDeniedError,
    ResourceExhaustedError,
    decode_header,
    encode_header,
    encode_payload,
    error_header,
    response_to,
    unpack_header,
)


class ScriptedBroker:
    """A real ROUTER that answers each command with the next scripted outcome and records ids."""

    def __init__(self, outcomes: list[Exception | object]) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.outcomes = list(outcomes)
        self.ids: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.outcomes:
            if not self.sock.poll(5000):
                return
            ident, header, _payload = self.sock.recv_multipart()
            cmd = decode_header(header)
            if cmd.service == "mesh":  # the client's heartbeat: answered, not scripted
                self.sock.send_multipart([ident, encode_header(response_to(cmd, now=time.time())), encode_payload({"pong": True})])
                continue
            self.ids.append(unpack_header(header)["id"])
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, Exception):
                frames = [encode_header(error_header(outcome, now=time.time(), correlation_id=cmd.id)), b"\xc0"]
            else:
                frames = [encode_header(response_to(cmd, now=time.time())), encode_payload(outcome)]
            self.sock.send_multipart([ident, *frames])

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()


def test_a_retryable_error_is_retried_with_the_same_command_id():
    """Two RESOURCE_EXHAUSTED answers, then a result: the call succeeds and all three tries share one id."""
    broker = ScriptedBroker([ResourceExhaustedError("busy"), ResourceExhaustedError("busy"), {"ok": True}])
    try:
        with Client(broker.endpoint, timeout=5, retries=2) as c:
            assert c.call("svc", "act", {}) == {"ok": True}
        assert len(broker.ids) == 3 and len(set(broker.ids)) == 1
    finally:
        broker.close()


def test_retries_stop_when_they_run_out():
    """With retries=1 a second retryable error reaches the caller."""
    broker = ScriptedBroker([ResourceExhaustedError("busy"), ResourceExhaustedError("still busy")])
    try:
        with Client(broker.endpoint, timeout=5, retries=1) as c, pytest.raises(ResourceExhaustedError) as e:
            c.call("svc", "act", {})
        assert e.value.message == "still busy" and len(broker.ids) == 2
    finally:
        broker.close()


def test_a_non_retryable_error_is_not_retried():
    """ACCESS_DENIED is raised at once, after a single try."""
    broker = ScriptedBroker([AccessDeniedError("no")])
    try:
        with Client(broker.endpoint, timeout=5, retries=3) as c, pytest.raises(AccessDeniedError):
            c.call("svc", "act", {})
        assert len(broker.ids) == 1
    finally:
        broker.close()
