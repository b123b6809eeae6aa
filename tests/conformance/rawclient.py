"""A mesh client written from the documents alone: the conformance kit's client.

It speaks the wire contract of docs/protocol.md, docs/security.md, docs/events.md and
docs/errors.md with the libraries a client in any language would use (pyzmq, msgpack,
cryptography's AES-GCM, PyNaCl's ed25519) and nothing of the `mesh` package, so that what
the tests prove with it is what the documents promise, not what the SDK happens to do.
`tests/integration/test_conformance.py` checks that it imports no `mesh` module.

Against a running mesh (the quickstart's, from the repository's root)::

    import sys; sys.path.insert(0, "tests/conformance")
    from rawclient import RawClient, load_credentials
    with RawClient("tcp://127.0.0.1:5555", load_credentials("var/mesh/credentials/dev.toml")) as c:
        print(c.call("echo", "echo", {"text": "hi"}, level=3))

Rules of this module:

* Every byte it sends is built here from the documented rules: the header map in the
  order of protocol.md 3.6, floats as float 64 (`ts`, `deadline`), payloads as one
  MessagePack value, the AES-GCM associated data and the signing bytes of 3.4.
* Replies and events are decoded here too, and an `error` reply becomes a `WireError`
  holding the code, message, retryable flag and details exactly as received.
* Sockets have linger 0 and are closed by `close()` (or the `with` block).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import msgpack
import zmq
import zmq.auth
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

__all__ = ["Credentials", "Event", "KeyRing", "RawClient", "RawSubscriber", "WireError", "associated_data",
           "canonical", "load_credentials", "pack", "signing_bytes", "trusted_keys", "unpack", "verify_signature"]

VERSION = 1
AAD_KEYS = ("action", "correlation_id", "id", "kid", "service", "topic", "type")  # security.md / protocol 3.4
UNSIGNED = ("seq", "sender")  # what the broker stamps: outside the signing bytes
UNSIGNED_SECURITY = ("signature", "token")


class WireError(Exception):
    """An `error` reply, as the wire carried it (protocol.md 3.5)."""

    def __init__(self, error: Mapping[str, Any], header: Mapping[str, Any]) -> None:
        super().__init__(f"{error.get('code')} {error.get('message')}")
        self.code: int = error["code"]
        self.message: str = error["message"]
        self.retryable: bool = error["retryable"]
        self.details: dict[str, Any] = dict(error.get("details") or {})
        self.header = dict(header)


@dataclass(frozen=True)
class Credentials:
    """What a credentials TOML file names (security.md), read without the SDK.

    Paths in the file are absolute or relative to the file's own directory.
    """

    broker_key: Path
    key: Path
    token: str | None
    level: int
    keyring: Path | None
    signing_key: Path | None
    signers: Path | None


def load_credentials(path: str | os.PathLike[str]) -> Credentials:
    """Read a credentials file.

    Args:
        path: a `credentials/NAME.toml` file of a state directory.

    Returns:
        Its paths resolved, its token and level.
    """
    p = Path(path)
    data = tomllib.loads(p.read_text(encoding="utf-8"))

    def where(key: str) -> Path | None:
        return p.parent / data[key] if key in data else None

    signers = where("signers")
    if signers is None and p.parent.name == "credentials":
        signers = p.parent.parent / "signing" / "trusted"
    return Credentials(where("broker_key"), where("key"), data.get("token"), data.get("level", 1),  # type: ignore[arg-type]
                       where("keyring"), where("signing_key"), signers)


def pack(value: Any) -> bytes:
    """MessagePack as the protocol wants it: `str` for text, `bin` for bytes, floats as float 64."""
    return msgpack.packb(value, use_bin_type=True, use_single_float=False)


def unpack(frame: bytes) -> Any:
    """Exactly one MessagePack value (trailing bytes are an error)."""
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def canonical(value: Any) -> Any:
    """Maps with keys sorted at every depth (protocol.md 3.4: the signing bytes)."""
    if isinstance(value, Mapping):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def associated_data(header: Mapping[str, Any], kid: str) -> bytes:
    """AES-GCM's associated data: the map, keys sorted, of the header's fixed fields and `kid`."""
    fields = {k: (kid if k == "kid" else header[k]) for k in AAD_KEYS if k == "kid" or k in header}
    return pack(fields)


def signing_bytes(header: Mapping[str, Any], payload_frame: bytes) -> bytes:
    """What an ed25519 signature covers: the canonical header without `seq`, `sender`,
    `security.signature` and `security.token`, then the payload frame's bytes."""
    h = {k: v for k, v in header.items() if k not in UNSIGNED}
    if isinstance(h.get("security"), Mapping):
        h["security"] = {k: v for k, v in h["security"].items() if k not in UNSIGNED_SECURITY}
    return pack(canonical(h)) + payload_frame


def new_id() -> str:
    """A fresh message id (any 1 to 64 printable ASCII characters will do)."""
    return "raw-" + secrets.token_hex(12)


class KeyRing:
    """keyring.json: `{"version": 1, "active": kid, "keys": {kid: {"key": base64, ...}}}`."""

    def __init__(self, path: Path) -> None:
        doc = json.loads(path.read_text())
        self.active: str = doc["active"]
        self.keys = {kid: base64.b64decode(e["key"]) for kid, e in doc["keys"].items()}


def trusted_keys(directory: Path) -> dict[str, VerifyKey]:
    """The trust store: `NAME.pub` files of 64 hex digits, named by their stem."""
    return {p.stem: VerifyKey(bytes.fromhex(p.read_text().strip())) for p in directory.glob("*.pub")}


class _Peer:
    """What a client and a subscriber share: credentials and the CURVE setup of a socket."""

    def __init__(self, kind: int, creds: Credentials | None, curve_secret: bytes | None = None,
                 curve_public: bytes | None = None) -> None:
        self.creds = creds
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(kind)
        self.sock.linger = 0
        if creds is not None:
            server_public, _ = zmq.auth.load_certificate(str(creds.broker_key))
            public, secret = zmq.auth.load_certificate(str(creds.key))
            self.sock.curve_serverkey = server_public
            self.sock.curve_publickey = curve_public or public
            self.sock.curve_secretkey = curve_secret or secret
        self.ring = KeyRing(creds.keyring) if creds is not None and creds.keyring else None
        self.signing = (SigningKey(bytes.fromhex(creds.signing_key.read_text().strip()))
                        if creds is not None and creds.signing_key else None)

    def close(self) -> None:
        self.sock.close(linger=0)

    def decrypt(self, header: Mapping[str, Any], frame: bytes) -> Any:
        """The payload value of a received message, decrypted when `security.encryption` says so."""
        info = (header.get("security") or {}).get("encryption")
        if info is not None:
            assert info["alg"] == "A256GCM" and self.ring is not None
            frame = AESGCM(self.ring.keys[info["kid"]]).decrypt(info["nonce"], frame, associated_data(header, info["kid"]))
        return unpack(frame)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawClient(_Peer):
    """A DEALER on a broker's client endpoint, sealing what it sends as security.md says.

    Args:
        endpoint: the broker's client endpoint.
        creds: credentials (security on), or None (security off).
        curve_secret, curve_public: another CURVE pair (z85) than the credentials' (a stranger).
        connect: False leaves the connecting to the caller (`self.sock.connect(endpoint)`),
            who may first attach a socket monitor to watch the CURVE handshake.
    """

    def __init__(self, endpoint: str, creds: Credentials | None = None, *,
                 curve_secret: bytes | None = None, curve_public: bytes | None = None, connect: bool = True) -> None:
        super().__init__(zmq.DEALER, creds, curve_secret, curve_public)
        if connect:
            self.sock.connect(endpoint)

    def header(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A header map in the documented key order (3.6): v, type, id, ts, then `fields`."""
        h: dict[str, Any] = {"v": VERSION, "type": kind, "id": fields.pop("id", None) or new_id(), "ts": time.time()}
        h.update(fields)
        return h

    def seal(self, header: dict[str, Any], payload: Any, level: int, *, token: str | None = None,
             aad_header: Mapping[str, Any] | None = None) -> tuple[bytes, bytes]:
        """The header and payload frames of a message at `level` (security.md, Levels).

        Args:
            header: the header map; its `security` is filled here when `level` >= 1.
            payload: the payload value.
            level: 0 plain, 1 token, 2 + AES-256-GCM, 3 + ed25519 signature.
            token: the token to send (default: the credentials').
            aad_header: the header the associated data is computed from (default:
                `header`; another one makes a relabelled message).
        """
        frame = pack(payload)
        if level == 0:
            return pack(header), frame
        sec: dict[str, Any] = {"level": level}
        tok = token if token is not None else (self.creds.token if self.creds else None)
        if tok:
            sec["token"] = tok
        header["security"] = sec
        if level >= 2:
            assert self.ring is not None, "level 2 needs a key ring"
            kid, nonce = self.ring.active, os.urandom(12)
            aad = associated_data(aad_header or header, kid)
            frame = AESGCM(self.ring.keys[kid]).encrypt(nonce, frame, aad)
            sec["encryption"] = {"alg": "A256GCM", "kid": kid, "nonce": nonce}
        if level >= 3:
            assert self.signing is not None, "level 3 needs a signing key"
            sec["signature"] = self.signing.sign(signing_bytes(header, frame)).signature
        return pack(header), frame

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def receive(self, correlation_id: str | None, timeout: float = 10.0) -> tuple[dict[str, Any], bytes]:
        """The next reply whose `correlation_id` is `correlation_id` (others are dropped).

        Raises:
            TimeoutError: nothing matching in `timeout` seconds.
        """
        give_up = time.monotonic() + timeout
        while (left := give_up - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            frames = self.sock.recv_multipart()
            assert len(frames) == 2, f"a reply is [header, payload], got {len(frames)} frames"
            header = unpack(frames[0])
            if header.get("correlation_id") == correlation_id:
                return header, frames[1]
        raise TimeoutError(f"no reply to {correlation_id} in {timeout} s")

    def open(self, header: Mapping[str, Any], frame: bytes) -> Any:
        """The payload value of a reply, decrypted when `security.encryption` says so.

        Raises:
            WireError: the reply is an `error`.
        """
        if header["type"] == "error":
            assert frame == b"\xc0", "an error's payload frame is nil"
            raise WireError(header["error"], header)
        return self.decrypt(header, frame)

    def call(self, service: str, action: str, payload: Any = None, *, level: int | None = None,
             timeout: float = 10.0, **fields: Any) -> Any:
        """Send a command and return its result.

        Args:
            level: the security level (default: the credentials', 0 without credentials).
            fields: more header keys (`deadline`, `metadata`), written after `action`.

        Raises:
            WireError: the answer is an error.
        """
        header = self.header("command", service=service, action=action, **fields)
        lvl = (self.creds.level if self.creds else 0) if level is None else level
        self.send(list(self.seal(header, payload, lvl)))
        return self.open(*self.receive(header["id"], timeout))

    def publish(self, topic: str, payload: Any, *, level: int = 1) -> int:
        """Publish an event on the client link; its `seq` from the broker's acknowledgement."""
        header = self.header("event", topic=topic)
        self.send(list(self.seal(header, payload, level)))
        return self.open(*self.receive(header["id"]))["seq"]


@dataclass(frozen=True)
class Event:
    """An event as a subscriber received it: frame 0, the decoded header and both raw frames."""

    prefix: bytes
    header: dict[str, Any]
    header_frame: bytes
    payload_frame: bytes


class RawSubscriber(_Peer):
    """An XSUB on a broker's event endpoint (protocol.md section 12).

    Args:
        endpoint: the event endpoint (`events` of `mesh.ping`'s result).
        creds: credentials (security on: the token goes in an `ff 00` filter).
    """

    def __init__(self, endpoint: str, creds: Credentials | None = None) -> None:
        super().__init__(zmq.XSUB, creds)
        self.sock.connect(endpoint)

    def subscribe(self, *topics: str, timeout: float = 10.0) -> dict[str, Any]:
        """Subscribe to `topics` (and all below each), show the token, sync, and return
        the sync marker's payload once every filter is in force.

        Raises:
            TimeoutError: no sync marker came.
        """
        for topic in topics:
            self.sock.send(b"\x01" + topic.encode() + b".")
        if self.creds is not None and self.creds.token:
            self.sock.send(b"\x01\xff\x00" + self.creds.token.encode())
        sync = b"\xff" + secrets.token_hex(16).encode()
        self.sock.send(b"\x01" + sync)
        give_up = time.monotonic() + timeout
        while (left := give_up - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            frames = self.sock.recv_multipart()
            if frames[0] == sync:
                self.sock.send(b"\x00" + sync)
                header = unpack(frames[1])
                assert header["topic"] == "mesh.subscribed" and header["seq"] == 1
                return unpack(frames[2])
        raise TimeoutError("no sync marker")

    def next_event(self, timeout: float = 10.0) -> Event:
        """The next event (sync markers, frame 0 starting `ff`, are skipped).

        Raises:
            TimeoutError: none in `timeout` seconds.
        """
        give_up = time.monotonic() + timeout
        while (left := give_up - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            frames = self.sock.recv_multipart()
            if frames[0].startswith(b"\xff"):
                continue
            return Event(frames[0], unpack(frames[1]), frames[1], frames[2])
        raise TimeoutError("no event")


def verify_signature(trusted: Mapping[str, VerifyKey], header: Mapping[str, Any], payload_frame: bytes,
                     sender: str | None) -> str:
    """Check a level-3 message as its receiver must (protocol.md 3.4, in the order of its table).

    Returns:
        "ok", or the `details.reason` a receiver refuses the message with.
    """
    signature = (header.get("security") or {}).get("signature")
    if signature is None:
        return "missing"
    if not isinstance(signature, bytes) or len(signature) != 64:
        return "malformed"
    if sender is None:
        return "missing sender"
    key = trusted.get(sender)
    if key is None:
        return "unknown signer"
    try:
        key.verify(signing_bytes(header, payload_frame), signature)
    except BadSignatureError:
        return "does not verify"
    return "ok"
