"""Signatures checked end to end: a quickstart-like secure mesh, raw sockets holding admitted keys.

Every level-3 command reaches a node that checks its signature with the key of the
client the broker names; every level-3 event reaches subscribers that do the same. The
attacks come from outside the SDK (a raw DEALER with a real client's CURVE key and
token), so nothing in the SDK can hide a missing check.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import msgpack
import pytest
import zmq
from nacl.signing import SigningKey

from mesh.client import Client
from mesh.protocol import encode_command_header, encode_event_header, encode_payload, new_id, unpack_header
from mesh.security.credentials import load_credentials
from mesh.security.signing import load_signing_key
from mesh.security.state import StateLayout, ensure_state
from mesh.subscription import Event, Gap
from mesh.testing import BrokerProcess, run_broker, run_node

WAIT_S = 10.0


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> StateLayout:
    """A state directory as `mesh up` makes it: two admin clients (dev, eve) and the echo node."""
    return ensure_state(
        tmp_path_factory.mktemp("sig") / "state",
        nodes={"echo": ["echo"]}, clients={"dev": ["admin"], "eve": ["admin"]}, now=time.time(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def mesh(layout: StateLayout) -> Iterator[BrokerProcess]:
    """A secure broker and the echo node with the credentials `ensure_state` wrote (no required signers)."""
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(layout.root)) as b:
        with run_node("echo", b, "--credentials", str(layout.credentials("echo"))):
            with Client(b.clients, timeout=WAIT_S, credentials=load_credentials(layout.credentials("dev"))) as c:
                c.call("echo", "echo", {"ready": True})  # the node has registered
            yield b


class RawClient:
    """A DEALER holding an admitted client's CURVE key and token, sealing by hand."""

    def __init__(self, b: BrokerProcess, layout: StateLayout, name: str) -> None:
        self.creds = load_credentials(layout.credentials(name))
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.creds.secure(self.sock)
        self.sock.connect(b.clients)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def send(self, header: bytes, payload: Any, *, signing_key: SigningKey | None, signature: Any = "sign") -> str:
        """Seal at level 3 (token, encryption, then the signature `signing_key` makes), then
        replace the signature with `signature` unless it is "sign" (None drops it)."""
        sealer = replace(self.creds.sealer(), level=3, signing_key=signing_key)
        hframe, body = sealer.seal(unpack_header(header), encode_payload(payload), time.time())
        h = unpack_header(hframe)
        if signature is None:
            h["security"].pop("signature", None)
        elif signature != "sign":
            h["security"]["signature"] = signature(h["security"]["signature"])
        self.sock.send_multipart([msgpack.packb(h, use_bin_type=True), body])
        return h["id"]

    def reply(self, cid: str) -> dict[str, Any]:
        """The header of the reply to `cid` (the broker's acknowledgement for an event)."""
        deadline = time.monotonic() + WAIT_S
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            header = unpack_header(self.sock.recv_multipart()[0])
            if header.get("correlation_id") == cid:
                return header
        raise AssertionError(f"no reply to {cid}")


@pytest.fixture
def dev(mesh: BrokerProcess, layout: StateLayout) -> Iterator[RawClient]:
    raw = RawClient(mesh, layout, "dev")
    yield raw
    raw.close()


def command(dev: RawClient, **kwargs: Any) -> dict[str, Any]:
    cid = dev.send(encode_command_header("echo", "echo", id=new_id(), now=time.time()), {"n": 1}, **kwargs)
    return dev.reply(cid)


def flip(signature: bytes) -> bytes:
    return bytes([signature[0] ^ 1]) + signature[1:]


STRANGER = SigningKey.generate()


def test_a_good_signature_is_answered(dev: RawClient, layout: StateLayout) -> None:
    """A level-3 command signed with the sending client's own key runs."""
    reply = command(dev, signing_key=load_signing_key(layout.signing_key("dev")))
    assert reply["type"] == "response"


@pytest.mark.parametrize(
    ("case", "reason"),
    [("corrupted", "does not verify"), ("10 bytes", "malformed"), ("stranger's key", "does not verify"),
     ("another client's key", "does not verify"), ("none", "missing")],
)
def test_each_bad_signature_is_refused_with_its_reason(dev: RawClient, layout: StateLayout, case: str, reason: str) -> None:
    """Whatever is wrong with a level-3 command's signature, it is answered 2004 with its reason,
    never run: the node checks it with the key of the client the broker names, not any key."""
    own = load_signing_key(layout.signing_key("dev"))
    kwargs: dict[str, Any] = {
        "corrupted": {"signing_key": own, "signature": flip},
        "10 bytes": {"signing_key": own, "signature": lambda s: s[:10]},
        "stranger's key": {"signing_key": STRANGER},
        "another client's key": {"signing_key": load_signing_key(layout.signing_key("eve"))},
        "none": {"signing_key": None, "signature": None},
    }[case]
    reply = command(dev, **kwargs)
    assert reply["type"] == "error"
    assert (reply["error"]["code"], reply["error"]["details"]["reason"]) == (2004, reason)


def test_a_signer_taken_out_of_the_trust_store_is_unknown_until_put_back(
    mesh: BrokerProcess, layout: StateLayout
) -> None:
    """The node re-reads the trust store: eve's good signature is refused as "unknown signer"
    once her public key is removed, and accepted again once it is back."""
    eve = RawClient(mesh, layout, "eve")
    key = load_signing_key(layout.signing_key("eve"))
    public = layout.trusted_signers / "eve.pub"
    kept = public.with_name("eve.pub.kept")
    try:
        shutil.move(public, kept)
        reason = _poll(lambda: command(eve, signing_key=key), lambda r: r["type"] == "error")
        assert (reason["error"]["code"], reason["error"]["details"]["reason"]) == (2004, "unknown signer")
        shutil.move(kept, public)
        assert _poll(lambda: command(eve, signing_key=key), lambda r: r["type"] == "response")
    finally:
        if kept.exists():
            shutil.move(kept, public)
        eve.close()


def _poll(make: Any, done: Any) -> Any:
    """`make()` again until `done(result)`: the store is re-read at most once a second."""
    deadline = time.monotonic() + WAIT_S
    while True:
        result = make()
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_a_subscriber_never_takes_a_badly_signed_event(dev: RawClient, mesh: BrokerProcess, layout: StateLayout) -> None:
    """A level-3 event with a corrupted signature, or signed by another client, reaches the SDK's
    subscriber as a "refused" gap; a well-signed one (encrypted too) is delivered decrypted."""
    own = load_signing_key(layout.signing_key("dev"))
    with Client(mesh.clients, timeout=WAIT_S, credentials=load_credentials(layout.credentials("eve"))) as c:
        with c.subscribe("signed") as sub:
            for kwargs in ({"signing_key": own, "signature": flip},
                           {"signing_key": load_signing_key(layout.signing_key("eve"))},
                           {"signing_key": own}):  # fmt: skip
                eid = dev.send(encode_event_header("signed.t", id=new_id(), now=time.time()), {"v": 1}, **kwargs)
                assert dev.reply(eid)["type"] == "response"  # the broker cannot check it: it numbers it
            items = [sub.get(WAIT_S) for _ in range(3)]
            assert [type(i) for i in items] == [Gap, Gap, Event]
            assert [(i.reason, i.error.details["reason"]) for i in items[:2]] == [("refused", "does not verify")] * 2
            assert items[2].payload == {"v": 1} and sub.refused == 2
