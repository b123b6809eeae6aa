"""docs/vectors.json is right twice over: the project's code makes exactly these bytes, and
the libraries a client in another language would use (msgpack, AES-GCM, ed25519) read and
remake them without the project's help. protocol.md shows the same vectors.

The independent checks re-derive each derived value here, in a few lines, from the
rules of docs/protocol.md (section 3.4): the AES-GCM associated data, the bytes a
signature covers, the ciphertext and tag, the signature itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
import vectors
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.signing import SigningKey, VerifyKey
from test_protocol_doc_vectors import _from_json, _hex

from mesh.protocol import (
    decode_header,
    encode_header,
    encode_stamped_event,
    unpack_header,
)
from mesh.security.envelope import Opener
from mesh.security.payload import KeyRing, KeyRingFile, associated_data, decrypt
from mesh.security.signing import SignerStore, TrustedKeys, verify

DOCS = Path(__file__).resolve().parents[2] / "docs"
FILE = json.loads((DOCS / "vectors.json").read_text(encoding="utf-8"))
PROTOCOL = (DOCS / "protocol.md").read_text(encoding="utf-8")
PLAIN, SECURED = FILE["plain"], FILE["secured"]
ALL = PLAIN + SECURED
AAD_FIELDS = ("id", "type", "service", "action", "topic", "correlation_id")




def same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down, maps in the same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def sorted_pack(value: Any) -> bytes:
    """MessagePack with map keys sorted at every depth: the rule of section 3.4, written again."""
    def sort(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: sort(v[k]) for k in sorted(v)}
        return [sort(x) for x in v] if isinstance(v, list) else v
    return msgpack.packb(sort(value), use_bin_type=True)


def frames(v: dict[str, Any]) -> tuple[dict[str, Any], bytes, bytes]:
    """A vector's header map (from its JSON), header frame and payload frame."""
    return _from_json(v["header"]), _hex(v["header_hex"]), _hex(v["payload_hex"])


def test_the_file_is_what_the_code_makes() -> None:
    """Regenerating the vectors from the codec, the Sealer and the broker's stamping gives the
    file as committed (run `python tests/unit/vectors.py` after a deliberate change)."""
    made = vectors.build()
    for part in ("plain", "secured"):
        for ours, theirs in zip(made[part], FILE[part], strict=True):
            assert ours == theirs, ours["name"]
    assert made == FILE


def test_every_security_level_has_a_vector() -> None:
    """Levels 0 to 3 are covered; levels 2 and 3 carry AES-GCM data, level 3 an ed25519 signature,
    and a stamped event shows the broker's `seq` and `sender`."""
    assert {v["level"] for v in SECURED} == {0, 1, 2, 3}
    for v in SECURED:
        assert ("aes_256_gcm" in v) == (v["level"] >= 2), v["name"]
        assert ("ed25519" in v) == (v["level"] == 3), v["name"]
    assert any("seq" in v["header"] and "sender" in v["header"] for v in SECURED)


@pytest.mark.parametrize("v", ALL, ids=[v["name"] for v in ALL])
def test_msgpack_reads_and_writes_the_header_bytes(v: dict[str, Any]) -> None:
    """The header frame is the JSON map, key order and types included, for plain msgpack both ways."""
    header, header_frame, _ = frames(v)
    assert same(msgpack.unpackb(header_frame, raw=False), header)
    assert msgpack.packb(header, use_bin_type=True) == header_frame


@pytest.mark.parametrize("v", ALL, ids=[v["name"] for v in ALL])
def test_the_codec_accepts_and_remakes_the_header_bytes(v: dict[str, Any]) -> None:
    """The broker's validation accepts each header, and the codec writes the same bytes back
    (the broker's stamping for a header carrying `sender`)."""
    header, header_frame, _ = frames(v)
    assert same(unpack_header(header_frame), header)
    if "sender" in header:
        assert encode_stamped_event(header, header["seq"], header["sender"]) == header_frame
    else:
        assert encode_header(decode_header(header_frame)) == header_frame


@pytest.mark.parametrize("v", ALL, ids=[v["name"] for v in ALL])
def test_the_plain_payload_is_one_messagepack_value(v: dict[str, Any]) -> None:
    """The plain payload frame decodes to the payload; without encryption it is the frame sent."""
    plain = _hex(v.get("plain_payload_hex", v["payload_hex"]))
    assert same(msgpack.unpackb(plain, raw=False), _from_json(v["payload"]))
    if "aes_256_gcm" not in v:
        assert _hex(v["payload_hex"]) == plain


ENCRYPTED = [v for v in SECURED if "aes_256_gcm" in v]
SIGNED = [v for v in SECURED if "ed25519" in v]


@pytest.mark.parametrize("v", ENCRYPTED, ids=[v["name"] for v in ENCRYPTED])
def test_aes_gcm_vectors_hold_with_the_library(v: dict[str, Any]) -> None:
    """The associated data is the sorted map of the header's fixed fields and the key id; AESGCM of
    the plain payload with it gives the payload frame, ciphertext then 16-byte tag."""
    header, _, payload = frames(v)
    aes = v["aes_256_gcm"]
    key, nonce, kid = bytes.fromhex(aes["key_hex"]), bytes.fromhex(aes["nonce_hex"]), aes["kid"]
    assert header["security"]["encryption"] == {"alg": "A256GCM", "kid": kid, "nonce": nonce}
    aad = sorted_pack({**{k: header[k] for k in AAD_FIELDS if k in header}, "kid": kid})
    assert aad == _hex(aes["aad_hex"])
    assert same(msgpack.unpackb(aad), aes["aad"])
    plain = _hex(v["plain_payload_hex"])
    assert AESGCM(key).encrypt(nonce, plain, aad) == payload == _hex(aes["ciphertext_hex"]) + _hex(aes["tag_hex"])
    assert len(_hex(aes["tag_hex"])) == 16
    assert AESGCM(key).decrypt(nonce, payload, aad) == plain
    # And the project's own decryption agrees.
    assert associated_data(header, kid) == aad
    assert decrypt(KeyRing({kid: key}, kid), payload, header["security"]["encryption"], aad) == plain


@pytest.mark.parametrize("v", SIGNED, ids=[v["name"] for v in SIGNED])
def test_ed25519_vectors_hold_with_the_library(v: dict[str, Any]) -> None:
    """The signing bytes are the sorted header without signature, token, seq and sender, then the
    payload frame as sent; the seed's key signs them to the header's signature."""
    header, _, payload = frames(v)
    ed = v["ed25519"]
    signature = _hex(ed["signature_hex"])
    assert header["security"]["signature"] == signature
    kept = {k: val for k, val in header.items() if k not in ("seq", "sender")}
    kept["security"] = {k: val for k, val in header["security"].items() if k not in ("signature", "token")}
    signed = _hex(ed["signing_bytes_hex"])
    assert sorted_pack(kept) + payload == signed
    key = SigningKey(bytes.fromhex(ed["seed_hex"]))
    assert bytes(key.verify_key).hex() == ed["public_hex"]
    assert key.sign(signed).signature == signature
    VerifyKey(bytes.fromhex(ed["public_hex"])).verify(signed, signature)
    # And the project's own check agrees, with the key of the sender the broker names.
    trusted = TrustedKeys({ed["signer"]: key.verify_key})
    assert verify(trusted, header, payload, signer=ed["signer"]) == ed["signer"]


@pytest.mark.parametrize("v", SIGNED + ENCRYPTED, ids=[v["name"] for v in SIGNED + ENCRYPTED])
def test_a_receiver_opens_each_secured_vector(v: dict[str, Any], tmp_path: Path) -> None:
    """The SDK's receiving half (signature first, then decryption) gives back the plain payload."""
    keys = FILE["keys"]
    ring = tmp_path / "keyring.json"
    KeyRing({keys["kid"]: bytes.fromhex(keys["aes_256_gcm_key_hex"])}, keys["kid"]).save(ring)
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / f"{keys['signer']}.pub").write_text(keys["ed25519_public_hex"] + "\n")
    opener = Opener(ring=KeyRingFile(ring), signers=SignerStore(tmp_path / "trusted"))
    header, _, payload = frames(v)
    sender = header.get("sender", v.get("sender"))
    assert opener.open(header, payload, 0.0, sender) == _hex(v["plain_payload_hex"])


def _doc_blocks(text: str) -> list[dict[str, Any]]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, flags=re.DOTALL)]


def test_protocol_md_section_11_shows_the_plain_vectors() -> None:
    """Section 11's blocks are the file's plain vectors, in the same order."""
    assert _doc_blocks(PROTOCOL.split("## 11. Test vectors", 1)[1].split("\n## 12.", 1)[0]) == PLAIN


def test_protocol_md_shows_a_worked_example_of_encryption_and_of_signing() -> None:
    """Every secured vector protocol.md shows is the file's, and it shows a level-2 and a level-3 one."""
    by_name = {v["name"]: v for v in SECURED}
    shown = [b for b in _doc_blocks(PROTOCOL) if b.get("name") in by_name]
    for block in shown:
        assert block == by_name[block["name"]], block["name"]
    assert {"level 2 command", "level 3 command"} <= {b["name"] for b in shown}
