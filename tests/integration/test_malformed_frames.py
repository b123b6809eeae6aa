"""Garbage sent to a real broker is answered or counted, and everyone else is still served."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq

from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    ErrorCode,
    command,
    decode_header,
    encode_header,
    encode_payload,
)
from mesh.testing import run_node


def good_header() -> bytes:
    return encode_header(command("alpha", "whoami", now=time.time(), deadline=time.time() + 5))


def bad_messages() -> dict[str, list[bytes]]:
    header = good_header()
    wrong_version = msgpack.unpackb(header)
    wrong_version["v"] = 99
    return {
        "random bytes": [os.urandom(40), os.urandom(40)],
        "truncated msgpack": [header[: len(header) // 2], encode_payload({})],
        "unknown version": [msgpack.packb(wrong_version), encode_payload({})],
        "one frame": [header],
        "three frames": [header, encode_payload({}), b"extra"],
        "oversized": [header, b"\x00" * (MAX_MESSAGE_BYTES + 1)],
        "header not a map": [msgpack.packb([1, 2, 3]), encode_payload({})],
    }


EXPECTED = {
    "random bytes": ErrorCode.BAD_FORMAT,
    "truncated msgpack": ErrorCode.BAD_FORMAT,
    "unknown version": ErrorCode.UNSUPPORTED_VERSION,
    "one frame": ErrorCode.BAD_FORMAT,
    "three frames": ErrorCode.BAD_FORMAT,
    "oversized": ErrorCode.MESSAGE_TOO_LARGE,
    "header not a map": ErrorCode.BAD_FORMAT,
}


@pytest.fixture
def raw_dealer(broker):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.connect(broker.clients)
    yield sock
    sock.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_malformed_message_is_answered_with_its_error_code(broker, raw_dealer, client_of, kind):
    """Each kind of malformed message gets an error reply with the right code; others are still served."""
    with run_node("testnodes:node", broker):
        good = client_of(broker)
        assert good.call("alpha", "whoami", {}) == {"node": "t"}
        raw_dealer.send_multipart(bad_messages()[kind])
        header_frame, payload_frame = raw_dealer.recv_multipart()
        reply = decode_header(header_frame)
        assert reply.type.value == "error"
        assert reply.error is not None and reply.error.code == EXPECTED[kind]
        assert payload_frame == b"\xc0"
        assert good.call("alpha", "whoami", {}) == {"node": "t"}
        stats = good.call("mesh", "stats")
        assert stats["counters"]["malformed"] == 1


def test_a_flood_of_garbage_does_not_stop_service(broker, raw_dealer, client_of):
    """Hundreds of malformed messages interleaved with real calls: every real call succeeds."""
    with run_node("testnodes:node", broker):
        good = client_of(broker)
        messages = list(bad_messages().values())
        for i in range(300):
            raw_dealer.send_multipart(messages[i % len(messages)])
            if i % 30 == 0:
                assert good.call("alpha", "typed", {"count": i}) == 2 * i
        answered = 0
        while raw_dealer.poll(2000):
            raw_dealer.recv_multipart()
            answered += 1
            if answered == 300:
                break
        assert answered == 300
        assert good.call("mesh", "stats")["counters"]["malformed"] == 300
