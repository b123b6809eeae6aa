"""A running secure broker sends what protocol.md and docs/vectors.json say, byte for byte
in structure: the same keys in the same order with the same MessagePack types (ids,
times and signatures differ). A raw DEALER and a raw XSUB holding a real client's CURVE
key talk to a real `mesh broker` process; the SDK only seals what they send.

Also the order of checks of protocol.md section 10.1, and that an integer `ts` is taken.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from mesh.client import Client
from mesh.protocol import (
    SecurityLevelTooLowError,
    encode_command_header,
    encode_event_header,
    encode_payload,
    new_id,
    unpack_header,
)
from mesh.security.credentials import Credentials, load_credentials
from mesh.security.signing import load_signing_key
from mesh.security.state import StateLayout, ensure_state
from mesh.testing import BrokerProcess, run_broker

WAIT_S = 10.0
FILE = json.loads((Path(__file__).resolve().parents[2] / "docs" / "vectors.json").read_text(encoding="utf-8"))
VECTORS = {v["name"]: v for v in FILE["plain"] + FILE["secured"]}


def shape(value: Any) -> Any:
    """What a decoded MessagePack value looks like without its values: maps as their keys in
    order with the shape of each value, lists as lists, anything else as its type's name."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def vector_header(name: str) -> dict[str, Any]:
    """A vector's header as a receiver decodes it (from its bytes, not its JSON)."""
    return msgpack.unpackb(bytes.fromhex("".join(VECTORS[name]["header_hex"]).replace(" ", "")), raw=False)


def decoded(frame: bytes) -> dict[str, Any]:
    """A header frame from the broker, decoded with its key order, after checking that the
    broker wrote every value in its shortest form (re-encoding gives the same bytes)."""
    value = msgpack.unpackb(frame, raw=False)
    assert msgpack.packb(value, use_bin_type=True) == frame
    return value


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> StateLayout:
    """A state directory with an admin client (dev) and one with the reader role (guest)."""
    return ensure_state(
        tmp_path_factory.mktemp("wire") / "state",
        nodes={"echo": ["echo"]}, clients={"dev": ["admin"], "guest": ["reader"]}, now=time.time(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def broker(layout: StateLayout) -> Iterator[BrokerProcess]:
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(layout.root)) as b:
        yield b


class Raw:
    """A DEALER on the client port with a client's CURVE key, sending sealed frames."""

    def __init__(self, ctx: zmq.Context, broker: BrokerProcess, creds: Credentials) -> None:
        self.creds = creds
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        creds.secure(self.sock)
        self.sock.connect(broker.clients)

    def send(self, header: bytes, payload: Any, sealed: int = 1, **security: Any) -> str:
        """Seal `header` at level `sealed` with the client's keys, change `security` as given, send it."""
        sealer = replace(self.creds.sealer(), level=sealed)
        frame, body = sealer.seal(unpack_header(header), encode_payload(payload), time.time())
        h = msgpack.unpackb(frame, raw=False)
        h["security"].update(security)
        self.sock.send_multipart([msgpack.packb(h, use_bin_type=True), body])
        return h["id"]

    def reply(self, cid: str) -> tuple[bytes, bytes]:
        """The header and payload frames of the broker's answer to `cid`."""
        deadline = time.monotonic() + WAIT_S
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            header, payload = self.sock.recv_multipart()
            if msgpack.unpackb(header, raw=False).get("correlation_id") == cid:
                return header, payload
        raise AssertionError(f"no answer to {cid}")


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def client(ctx: zmq.Context, broker: BrokerProcess, layout: StateLayout, name: str) -> Raw:
    return Raw(ctx, broker, load_credentials(layout.credentials(name)))


def error_of(raw: Raw, header: bytes, sealed: int = 1, **security: Any) -> dict[str, Any]:
    """Send a command that the broker refuses; check its reply has the error vector's structure.

    `security` replaces keys of the sealed `security` map (`level=3` claims a level not sealed)."""
    frame, payload = raw.reply(raw.send(header, None, sealed, **security))
    got = decoded(frame)
    want = vector_header("error reply")
    assert list(got) == list(want) and list(got["error"]) == list(want["error"])
    assert shape({k: v for k, v in got.items() if k != "error"}) == shape({k: v for k, v in want.items() if k != "error"})
    assert payload == b"\xc0"
    return got["error"]


def test_an_error_reply_has_the_vectors_structure(ctx: zmq.Context, broker: BrokerProcess, layout: StateLayout) -> None:
    """The broker's HANDLER_NOT_FOUND is laid out as the `error reply` vector: the same keys in the
    same order and types, details sorted as the vector's, and a nil payload frame."""
    dev = client(ctx, broker, layout, "dev")
    err = error_of(dev, encode_command_header("echo", "shout", id=new_id(), now=time.time()))
    want = vector_header("error reply")["error"]
    assert shape(err) == shape(want)
    assert err["details"] == {"service": "echo", "action": "shout", "missing": "service"}


def test_an_unreadable_header_is_answered_as_the_malformed_input_vector(
    ctx: zmq.Context, broker: BrokerProcess, layout: StateLayout
) -> None:
    """A version-2 header without a readable id gets exactly the `malformed-input error` vector's
    header but for its own id and time: no correlation_id, the same error map, a nil payload."""
    dev = client(ctx, broker, layout, "dev")
    dev.sock.send_multipart([msgpack.packb({"v": 2, "type": "command"}), b"\xc0"])
    assert dev.sock.poll(int(WAIT_S * 1000)), "no answer"
    frame, payload = dev.sock.recv_multipart()
    got, want = decoded(frame), vector_header("malformed-input error")
    assert shape(got) == shape(want)
    assert {k: v for k, v in got.items() if k not in ("id", "ts")} == {k: v for k, v in want.items() if k not in ("id", "ts")}
    assert payload == b"\xc0"


def test_access_is_decided_before_the_lookup(ctx: zmq.Context, broker: BrokerProcess, layout: StateLayout) -> None:
    """Section 10.1: a role that may not call an action of a service nobody offers is refused
    ACCESS_DENIED (2002), not HANDLER_NOT_FOUND (1003); a role that may gets the 1003."""
    unknown = encode_command_header("nosuch", "put", id=new_id(), now=time.time())
    assert error_of(client(ctx, broker, layout, "guest"), unknown)["code"] == 2002
    unknown = encode_command_header("nosuch", "put", id=new_id(), now=time.time())
    assert error_of(client(ctx, broker, layout, "dev"), unknown)["code"] == 1003


def test_a_level_without_its_encryption_names_what_is_missing(
    ctx: zmq.Context, broker: BrokerProcess, layout: StateLayout
) -> None:
    """Level 3 claimed on a plain payload: SECURITY_LEVEL_TOO_LOW with {level: 3, missing:
    "encryption"}, as protocol.md 3.4 and errors.md say (not a `required` level of 1)."""
    dev = client(ctx, broker, layout, "dev")
    err = error_of(dev, encode_command_header("echo", "echo", id=new_id(), now=time.time()))
    assert err["code"] == 1003  # the same message at its own level reaches the lookup (no echo node runs)
    err = error_of(dev, encode_command_header("echo", "echo", id=new_id(), now=time.time()), level=3)
    assert (err["code"], err["details"]) == (2007, {"level": 3, "missing": "encryption"})


def test_an_integer_ts_and_deadline_are_accepted(ctx: zmq.Context, broker: BrokerProcess, layout: StateLayout) -> None:
    """Section 3.6, rule 4: `ts` and `deadline` written as integers are taken; the answer is laid
    out as the `mesh.ping response` vector, header and payload, its own `ts` a float 64."""
    dev = client(ctx, broker, layout, "dev")
    now = int(time.time())
    h = {"v": 1, "type": "command", "id": new_id(), "ts": now, "service": "mesh", "action": "ping", "deadline": now + 30,
         "security": {"level": 1, "token": dev.creds.token}}
    dev.sock.send_multipart([msgpack.packb(h), b"\xc0"])  # msgpack writes both numbers as uint 32
    frame, payload = dev.reply(h["id"])
    assert shape(decoded(frame)) == shape(vector_header("mesh.ping response"))
    assert shape(msgpack.unpackb(payload)) == shape(VECTORS["mesh.ping response"]["payload"])


def test_a_signed_event_reaches_subscribers_as_the_stamped_vector(
    ctx: zmq.Context, broker: BrokerProcess, layout: StateLayout
) -> None:
    """A level-3 event comes out of the event port with the `level 3 stamped event` vector's keys,
    order and types (seq after topic, security without token, sender last), the publisher's
    payload frame unchanged, and a signature that verifies by the recipe of protocol.md 3.4.
    The sync marker and the acknowledgement follow their vectors too."""
    creds = load_credentials(layout.credentials("dev"))
    sub = ctx.socket(zmq.XSUB)
    sub.linger = 0
    creds.secure(sub)
    sub.connect(broker.events)
    sync = "s" * 32
    for filter in (b"wire.", b"\xff\x00" + creds.token.encode(), b"\xff" + sync.encode()):
        sub.send(b"\x01" + filter)
    assert sub.poll(int(WAIT_S * 1000)), "no sync marker"
    topic, marker, _ = sub.recv_multipart()
    assert topic == b"\xff" + sync.encode()
    assert shape(decoded(marker)) == shape(vector_header("stamped event"))

    dev = Raw(ctx, broker, creds)
    signer = load_signing_key(layout.signing_key("dev"))
    eid = dev.send(encode_event_header("wire.check", id=new_id(), now=time.time()), {"key": "theme"}, sealed=3)
    ack, seq = dev.reply(eid)
    assert shape(decoded(ack)) == shape(vector_header("event acknowledgement"))
    assert shape(msgpack.unpackb(seq)) == shape(VECTORS["event acknowledgement"]["payload"])

    assert sub.poll(int(WAIT_S * 1000)), "no event"
    topic, header, payload = sub.recv_multipart()
    assert topic == b"wire.check."
    got = decoded(header)
    assert shape(got) == shape(vector_header("level 3 stamped event"))
    assert got["sender"] == "dev" and got["seq"] == msgpack.unpackb(seq)["seq"]
    # The signing bytes: the header without seq, sender, signature and token, keys sorted, then the payload.
    kept = {k: v for k, v in got.items() if k not in ("seq", "sender")}
    kept["security"] = {k: v for k, v in got["security"].items() if k != "signature"}
    signed = msgpack.packb(_sorted(kept), use_bin_type=True) + payload
    signer.verify_key.verify(signed, got["security"]["signature"])


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value


def test_mesh_commands_stay_readable_by_the_broker_at_every_level(layout: StateLayout) -> None:
    """Section 4: the broker reads `mesh.*` payloads and holds no payload key, so the SDK sends
    them at level 1 at most, and a mesh whose minimum is level 2 still takes them. A level-3
    client pages through `mesh.services` and asks `mesh.replay`; an `echo` command at level 1
    is still refused there."""
    creds = load_credentials(layout.credentials("dev"))
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(layout.root), "--min-level", "2") as b:
        with Client(b.clients, timeout=WAIT_S, credentials=replace(creds, level=3)) as c:
            assert c.services() == {}
            assert c.call("mesh", "replay", {"prefix": "wire"})["events"] == []
        with Client(b.clients, timeout=WAIT_S, credentials=creds, retries=0) as c, pytest.raises(
            SecurityLevelTooLowError
        ):
            c.call("echo", "echo", {})
