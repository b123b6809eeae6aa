"""Makes docs/vectors.json from the real code: `python tests/unit/vectors.py` rewrites it.

Every header and payload frame here is made by the code that makes them in a running
mesh: the codec's encoders (`mesh.protocol`), the SDK's `Sealer` (token, AES-256-GCM,
ed25519, in the order clients and nodes write them) and the broker's
`encode_stamped_event`. Only the inputs are fixed: ids, times, the AES key and the
nonce (`os.urandom` is replaced while sealing), the ed25519 seed and the token. So a
change to any of that code changes the file, and `test_vectors_json.py` notices.

Notation of the file (the same as protocol.md's section 11): `{"$bin": "<hex>"}` is a
MessagePack `bin`; a JSON number with a decimal point is a float 64, one without an
integer; byte strings are lists of lines of up to 16 space-separated hex bytes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import msgpack
from nacl.signing import SigningKey

from mesh.protocol import (
    ErrorInfo,
    Header,
    MessageType,
    encode_cancel_header,
    encode_command_header,
    encode_event_header,
    encode_header,
    encode_payload,
    encode_progress_header,
    encode_stamped_event,
    unpack_header,
)
from mesh.security.envelope import Sealer
from mesh.security.payload import KeyRing, KeyRingFile, associated_data
from mesh.security.signing import signing_bytes

PATH = Path(__file__).resolve().parents[2] / "docs" / "vectors.json"

AES_KEY = bytes(range(0x80, 0xA0))  # 80 81 ... 9f
KID = "3f9a0c12"
NONCE = bytes(range(12))  # 00 01 ... 0b for the first message sealed, 10 11 ... 1b for the next...
SEED = bytes(range(1, 33))  # 01 02 ... 20
SIGNER = "dev"  # the CURVE key name the broker stamps as `sender`
# JWT-shaped but not signed by anyone: these vectors are about bytes, not about admission.
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZXYifQ.bm90LWEtcmVhbC1zaWduYXR1cmU"
TAG_BYTES = 16

CID = "4f1c2a9e7b3d45c8a0e6f2b1d9c3e5a7"
T0 = 1700000000.0


def hex_lines(data: bytes) -> list[str]:
    """Bytes as lines of up to 16 space-separated hex bytes."""
    return [" ".join(f"{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16)]


def to_json(value: Any) -> Any:
    """A decoded MessagePack value in the file's notation (bytes as {"$bin": hex})."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def _plain(name: str, link: str, header: bytes, payload: Any) -> dict[str, Any]:
    frame = encode_payload(payload)
    return {"name": name, "link": link, "header": to_json(unpack_header(header)), "payload": to_json(payload),
            "header_hex": hex_lines(header), "payload_hex": hex_lines(frame)}


def _error(id: str, ts: float, code: int, message: str, details: dict[str, Any], cid: str | None) -> bytes:
    err = ErrorInfo(code=code, message=message, retryable=False, details=details)
    return encode_header(Header(type=MessageType.ERROR, id=id, timestamp=ts, correlation_id=cid, error=err))


def plain_vectors() -> list[dict[str, Any]]:
    """Section 11 of protocol.md: headers without encryption, payloads that are MessagePack."""
    published = encode_event_header("kv.changed.user-settings", id="evt-42", now=1700000001.0)
    event = {"key": "theme", "version": 7}
    registration = {"name": "echo-1", "capacity": 8, "services": {"echo": {"actions": {"say": {
        "description": "Return the payload.",
        "schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "idempotent": True}}}}}
    with_token, _ = Sealer(level=1, token=lambda: TOKEN).seal(unpack_header(encode_command_header(
        "kv", "put", id="req-0001", now=T0, deadline=1700000005.5,
        metadata={"trace_id": "a1b2c3d4", "attempt": 2, "tags": ["batch", "nightly"]})), b"", T0)
    return [
        _plain("command", "client -> broker, then broker -> node",
               encode_command_header("echo", "say", id=CID, now=T0, deadline=1700000030.0), {"text": "hello"}),
        _plain("response", "node -> broker, then broker -> client", encode_header(Header(
            type=MessageType.RESPONSE, id="9b2e4d6f8a1c4e3b9d7f5a2c8e6b4d1f", timestamp=1700000000.25,
            service="echo", action="say", correlation_id=CID)), {"text": "hello"}),
        _plain("error reply", "broker -> client", _error(
            "c3a5e7f9b1d34f6a8c0e2b4d6f8a1c3e", 1700000000.5, 1003, "no node offers echo.shout",
            {"service": "echo", "action": "shout", "missing": "action"}, CID), None),
        _plain("command with metadata and security", "client -> broker, then broker -> node (security level 1)",
               with_token, {"key": "theme", "value": "dark"}),
        _plain("event", 'client -> broker ([b""] first from a node)', published, event),
        _plain("stamped event", "broker -> subscriber, after frame 0",
               encode_stamped_event(unpack_header(published), 7), event),
        _plain("event acknowledgement", "broker -> publisher", encode_header(Header(
            type=MessageType.RESPONSE, id="7a1c3e5b9d2f4a6c8e0b1d3f5a7c9e2b", timestamp=1700000001.002,
            correlation_id="evt-42")), {"seq": 7}),
        _plain("mesh.ping", "client -> broker", encode_command_header("mesh", "ping", id="ping-1", now=T0), None),
        _plain("mesh.ping response", "broker -> client", encode_header(Header(
            type=MessageType.RESPONSE, id="5d7f9b1c3e5a4c6e8a0b2d4f6a8c0e2b", timestamp=1700000000.001,
            service="mesh", action="ping", correlation_id="ping-1")),
            {"pong": True, "broker": "b1", "time": 1700000000.001, "events": "tcp://0.0.0.0:5557",
             "instance": "2d93b480e178910d0000000000000001"}),
        _plain("mesh.register", "node -> broker (envelope frame empty)",
               encode_command_header("mesh", "register", id="reg-1", now=T0), registration),
        _plain("malformed-input error",
               "broker -> client (no correlation_id: the offending header could not be read)", _error(
                   "0e1d2c3b4a5948675f4e3d2c1b0a0918", 1700000002.0, 1001, "protocol version 2 is not supported",
                   {"field": "v", "supported": [1]}, None), None),
        _plain("cancel", "client -> broker, then broker -> node",
               encode_cancel_header(CID, now=1700000000.5, id="cancel-1"), None),
        _plain("progress", "node -> broker, then broker -> client",
               encode_progress_header(CID, now=1700000000.25, id="progress-1"),
               {"progress": 2, "total": 5, "message": "2 of 5 files"}),
    ]


def _secured(name: str, link: str, level: int, header: bytes, wire_payload: bytes, plain: Any,
             sender: str | None) -> dict[str, Any]:
    h = unpack_header(header)
    sec = h.get("security", {})
    out: dict[str, Any] = {"name": name, "link": link, "level": level, "header": to_json(h),
                           "header_hex": hex_lines(header), "payload": to_json(plain),
                           "plain_payload_hex": hex_lines(encode_payload(plain)),
                           "payload_hex": hex_lines(wire_payload)}
    if sender is not None:
        out["sender"] = sender
    if "encryption" in sec:
        aad = associated_data(h, sec["encryption"]["kid"])
        out["aes_256_gcm"] = {
            "key_hex": AES_KEY.hex(), "kid": sec["encryption"]["kid"], "nonce_hex": sec["encryption"]["nonce"].hex(),
            "aad": to_json(msgpack.unpackb(aad)),
            "aad_hex": hex_lines(aad), "ciphertext_hex": hex_lines(wire_payload[:-TAG_BYTES]),
            "tag_hex": hex_lines(wire_payload[-TAG_BYTES:])}
    if "signature" in sec:
        key = SigningKey(SEED)
        out["ed25519"] = {
            "seed_hex": SEED.hex(), "public_hex": bytes(key.verify_key).hex(), "signer": SIGNER,
            "signing_bytes_hex": hex_lines(signing_bytes(h, wire_payload)),
            "signature_hex": hex_lines(sec["signature"])}
    return out


def secured_vectors(ring_file: KeyRingFile) -> list[dict[str, Any]]:
    """One message per security level as the SDK seals it, an encrypted reply, and a
    signed event before and after the broker stamps it."""
    key = SigningKey(SEED)
    client = {lvl: Sealer(level=lvl, token=lambda: TOKEN, ring=ring_file, signing_key=key) for lvl in (1, 2, 3)}
    node = Sealer(level=2, ring=ring_file)  # a node has no token; it answers encrypted commands encrypted
    args = {"text": "hello"}
    out = [_secured("level 0 command", "client -> broker, then broker -> node (security off)", 0,
                    encode_command_header("echo", "say", id=CID, now=T0), encode_payload(args), args, None)]
    nonces = (bytes(b + 16 * i for b in NONCE) for i in range(16))  # a nonce is never used twice
    with mock.patch("mesh.security.payload.os.urandom", lambda n: next(nonces)[:n]):
        for level, cid in ((1, "c0ffee01"), (2, "c0ffee02"), (3, "c0ffee03")):
            header, payload = client[level].seal(
                unpack_header(encode_command_header("echo", "say", id=cid, now=T0)), encode_payload(args), T0)
            out.append(_secured(f"level {level} command", "client -> broker, then broker -> node", level,
                                header, payload, args, SIGNER if level == 3 else None))
        result = {"text": "hello"}
        header, payload = node.seal(unpack_header(encode_header(Header(
            type=MessageType.RESPONSE, id="9b2e4d6f8a1c4e3b9d7f5a2c8e6b4d1f", timestamp=1700000000.25,
            service="echo", action="say", correlation_id="c0ffee03"))), encode_payload(result), T0)
        out.append(_secured("level 2 response", "node -> broker, then broker -> client (the reply to level 3 command)",
                            2, header, payload, result, None))
        event = {"key": "theme", "version": 7}
        published, body = client[3].seal(unpack_header(encode_event_header(
            "kv.changed.user-settings", id="evt-43", now=1700000001.0)), encode_payload(event), 1700000001.0)
    out.append(_secured("level 3 event", "client -> broker", 3, published, body, event, SIGNER))
    stamped = encode_stamped_event(unpack_header(published), 8, SIGNER)
    out.append(_secured("level 3 stamped event", "broker -> subscriber, after frame 0", 3, stamped, body, event, None))
    return out


def build() -> dict[str, Any]:
    """The whole vectors file as a JSON-able dict."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keyring.json"
        KeyRing({KID: AES_KEY}, KID).save(path)
        secured = secured_vectors(KeyRingFile(path))
    return {
        "about": "Test vectors of the mesh wire protocol, version 1 (docs/protocol.md). Made by "
                 "tests/unit/vectors.py from the real code, checked by tests/unit/test_vectors_json.py.",
        "notation": "{\"$bin\": hex} is a MessagePack bin; a number with a decimal point is a float 64, one "
                    "without an integer; *_hex values are lists of lines of hex bytes: join them, drop spaces",
        "keys": {"aes_256_gcm_key_hex": AES_KEY.hex(), "kid": KID,
                 "ed25519_seed_hex": SEED.hex(), "ed25519_public_hex": bytes(SigningKey(SEED).verify_key).hex(),
                 "signer": SIGNER, "token": TOKEN},
        "plain": plain_vectors(),
        "secured": secured,
    }


def render() -> str:
    """The file's text: JSON, two-space indent, keys in the order written."""
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    PATH.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {PATH}\n")
