"""Ed25519 message signatures: key files, trusted sets, sign/verify with real keys."""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from mesh.protocol import (
    MAX_METADATA_ENTRIES,
    ConfigurationError,
    SignatureInvalidError,
    encode_command_header,
    unpack_header,
)
from mesh.security.payload import KeyRing, associated_data, encrypt
from mesh.security.signing import (
    REASONS,
    TrustedKeys,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    public_key_path,
    sign,
    signing_bytes,
    verify,
)

NOW = 1_700_000_000.0
PAYLOAD = b"\x82\xa3key\xa1k\xa5value\xa1v"

ALICE = SigningKey.generate()
BOB = SigningKey.generate()
MALLORY = SigningKey.generate()
TRUSTED = TrustedKeys({"alice": ALICE.verify_key, "bob": BOB.verify_key})


def header(**changes: Any) -> dict[str, Any]:
    h = unpack_header(encode_command_header("kv", "put", id="c0ffee01", now=NOW,
                                            metadata={"trace": "t-1", "n": [1, 2]}))
    h["security"] = {"level": 3, "token": "eyJ.token.sig"}
    h.update(changes)
    return h


def signed(key: SigningKey, h: dict[str, Any], payload: bytes = PAYLOAD) -> dict[str, Any]:
    h = copy.deepcopy(h)
    h["security"]["signature"] = sign(key, h, payload)
    return h


def over_the_wire(h: dict[str, Any]) -> dict[str, Any]:
    return unpack_header(msgpack.packb(h, use_bin_type=True))


def refusal(exc_info: pytest.ExceptionInfo[SignatureInvalidError]) -> str:
    assert exc_info.value.code == 2004
    assert exc_info.value.details["reason"] in REASONS
    return exc_info.value.details["reason"]


# ------------------------------------------------------------------ key files


def test_generate_writes_a_private_and_a_public_key_file(tmp_path: Path) -> None:
    """The private key is 0600 hex, the public key sits beside it as NAME.pub."""
    path = tmp_path / "alice.key"
    key = generate_signing_key(path)
    public = public_key_path(path)
    assert public == tmp_path / "alice.pub"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644  # public keys are meant to be shared
    assert path.read_text() == bytes(key).hex() + "\n"
    assert public.read_text() == bytes(key.verify_key).hex() + "\n"
    assert load_signing_key(path) == key
    assert load_verify_key(public) == key.verify_key


def test_generate_never_overwrites_a_key(tmp_path: Path) -> None:
    """An existing private or public key file makes generation refuse."""
    path = tmp_path / "alice.key"
    first = generate_signing_key(path)
    with pytest.raises(ConfigurationError):
        generate_signing_key(path)
    path.unlink()
    with pytest.raises(ConfigurationError):
        generate_signing_key(path)  # alice.pub is still there
    assert load_verify_key(tmp_path / "alice.pub") == first.verify_key


def test_generate_refuses_a_private_key_named_pub(tmp_path: Path) -> None:
    """A private key at NAME.pub would be read as someone's public key."""
    with pytest.raises(ConfigurationError):
        generate_signing_key(tmp_path / "alice.pub")


@pytest.mark.parametrize("content", ["", "zz" * 32, "ab" * 31, "ab" * 33, "\xff"],
                         ids=["empty", "not-hex", "short", "long", "not-ascii"])
def test_bad_key_file_is_a_configuration_error(tmp_path: Path, content: str) -> None:
    """A key file is exactly 64 hex digits; anything else names the path."""
    path = tmp_path / "bad.pub"
    path.write_text(content, encoding="latin-1")
    with pytest.raises(ConfigurationError) as exc:
        load_verify_key(path)
    assert exc.value.details["path"] == str(path)
    with pytest.raises(ConfigurationError):
        load_signing_key(path)


def test_missing_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    """Loading an absent key says which file."""
    with pytest.raises(ConfigurationError) as exc:
        load_signing_key(tmp_path / "absent.key")
    assert exc.value.details["path"].endswith("absent.key")


def test_trusted_keys_load_every_pub_file_by_stem(tmp_path: Path) -> None:
    """Names are file stems; private keys and other files in the directory are ignored."""
    keys = tmp_path / "keys"
    keys.mkdir()
    alice = generate_signing_key(keys / "alice.key")
    node = generate_signing_key(keys / "node.1.key")
    (keys / "README").write_text("not a key")
    trusted = TrustedKeys.load(keys)
    assert sorted(trusted) == ["alice", "node.1"] and len(trusted) == 2
    assert trusted.get("alice") == alice.verify_key
    assert trusted.get("node.1") == node.verify_key
    assert "alice.key" not in trusted and trusted.get("mallory") is None


def test_trusted_keys_refuse_a_bad_member(tmp_path: Path) -> None:
    """One unreadable public key fails the load instead of silently shrinking the set."""
    generate_signing_key(tmp_path / "alice.key")
    (tmp_path / "broken.pub").write_text("nope\n")
    with pytest.raises(ConfigurationError) as exc:
        TrustedKeys.load(tmp_path)
    assert exc.value.details["path"].endswith("broken.pub")


def test_trusted_keys_need_their_directory(tmp_path: Path) -> None:
    """A missing trust directory is a configuration error."""
    with pytest.raises(ConfigurationError):
        TrustedKeys.load(tmp_path / "absent")


def test_signer_names_come_from_files_end_to_end(tmp_path: Path) -> None:
    """A key generated to disk signs; the directory's trust set names its owner."""
    key = generate_signing_key(tmp_path / "alice.key")
    h = signed(load_signing_key(tmp_path / "alice.key"), header())
    assert key == load_signing_key(tmp_path / "alice.key")
    assert verify(TrustedKeys.load(tmp_path), over_the_wire(h), PAYLOAD) == "alice"


# ------------------------------------------------------------------ sign and verify


def test_valid_signature_names_the_signer() -> None:
    """A 64-byte signature verifies after the header crossed the wire, naming its signer."""
    h = signed(BOB, header())
    assert len(h["security"]["signature"]) == 64
    assert verify(TRUSTED, over_the_wire(h), PAYLOAD) == "bob"
    assert verify(TRUSTED, over_the_wire(h), PAYLOAD, signer="bob") == "bob"


def test_signature_covers_the_encrypted_payload_and_its_info() -> None:
    """Sign after encrypting: the ciphertext and the encryption map are both covered."""
    ring = KeyRing.generate()
    h = header()
    frame, info = encrypt(ring, PAYLOAD, associated_data(h, ring.active_kid))
    h["security"] = {"level": 3, "encryption": info}
    h = signed(ALICE, h, frame)
    assert verify(TRUSTED, over_the_wire(h), frame) == "alice"
    nonce = info["nonce"]
    h["security"]["encryption"]["nonce"] = bytes([nonce[0] ^ 1]) + nonce[1:]
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, frame)
    assert refusal(exc) == "does not verify"


def test_key_order_does_not_matter() -> None:
    """Signing bytes are canonical: a reordered header (at any depth) verifies the same."""
    h = signed(ALICE, header())
    reordered = {k: h[k] for k in reversed(list(h))}
    reordered["metadata"] = dict(reversed(list(h["metadata"].items())))
    reordered["security"] = dict(reversed(list(h["security"].items())))
    assert verify(TRUSTED, reordered, PAYLOAD) == "alice"


def test_signing_bytes_leave_out_only_the_signature() -> None:
    """The signature itself is not signed; the header bytes come first, then the payload."""
    h = header()
    plain = signing_bytes(h, PAYLOAD)
    assert signing_bytes(signed(ALICE, h), PAYLOAD) == plain
    assert plain.endswith(PAYLOAD)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(plain)
    assert next(unpacker)["security"] == {"level": 3, "token": "eyJ.token.sig"}


@pytest.mark.parametrize(
    ("path", "value"),
    [(("id",), "c0ffee02"), (("service",), "fs"), (("action",), "delete"), (("ts",), NOW + 1),
     (("metadata", "trace"), "t-2"), (("security", "token"), "eyJ.other.sig"),
     (("security", "level"), 1), (("deadline",), NOW + 5)],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_tampered_header_field_does_not_verify(path: tuple[str, ...], value: Any) -> None:
    """Changing or adding any header field (routing, time, metadata, token, level) is caught."""
    h = over_the_wire(signed(ALICE, header()))
    target = h
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD)
    assert refusal(exc) == "does not verify"


@pytest.mark.parametrize("payload", [PAYLOAD[:-1], PAYLOAD + b"\x00", b"\x00" + PAYLOAD[1:]],
                         ids=["truncated", "extended", "changed"])
def test_tampered_payload_does_not_verify(payload: bytes) -> None:
    """Any change to the payload frame is caught."""
    h = signed(ALICE, header())
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, payload)
    assert refusal(exc) == "does not verify"


def test_untrusted_signer_does_not_verify() -> None:
    """Without a signer hint a stranger's signature is indistinguishable from a forgery."""
    h = signed(MALLORY, header())
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD)
    assert refusal(exc) == "does not verify"


def test_unknown_signer_is_named_when_the_caller_says_who_signed() -> None:
    """With `signer=`, a name outside the trusted set is refused as unknown."""
    h = signed(MALLORY, header())
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD, signer="mallory")
    assert refusal(exc) == "unknown signer"
    assert exc.value.details["signer"] == "mallory"


def test_nobody_is_known_to_an_empty_trust_set() -> None:
    """An empty trusted set refuses every signature as from an unknown signer."""
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TrustedKeys({}), signed(ALICE, header()), PAYLOAD)
    assert refusal(exc) == "unknown signer"


def test_signer_hint_checks_only_that_key() -> None:
    """Alice's valid signature claimed as Bob's does not verify."""
    h = signed(ALICE, header())
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD, signer="bob")
    assert refusal(exc) == "does not verify"


@pytest.mark.parametrize("signature", [b"\x00" * 63, b"\x00" * 65, b"", "a" * 64, 64],
                         ids=["63-bytes", "65-bytes", "empty", "str", "int"])
def test_malformed_signature_is_refused(signature: Any) -> None:
    """A signature that is not 64 bytes is malformed, before any key is tried."""
    h = header()
    h["security"]["signature"] = signature
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD)
    assert refusal(exc) == "malformed"


@pytest.mark.parametrize(
    "h",
    [{k: v for k, v in header().items() if k != "security"},
     header(security={"level": 3}),
     header(security={"level": 3, "signature": None}),
     header(security="not a map")],
    ids=["no-security", "no-signature", "nil-signature", "security-not-a-map"],
)
def test_missing_signature_is_refused(h: dict[str, Any]) -> None:
    """A message without a signature is refused as missing."""
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD)
    assert refusal(exc) == "missing"


# ------------------------------------------------------------------ properties

metadata_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
metadata = st.dictionaries(st.text(max_size=16), metadata_values, max_size=min(8, MAX_METADATA_ENTRIES))


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=2048), meta=metadata, signer=st.sampled_from(["alice", "bob"]))
def test_sign_then_verify_round_trips(payload: bytes, meta: dict[str, Any], signer: str) -> None:
    """Any payload bytes and header metadata sign and verify after crossing the wire."""
    key = {"alice": ALICE, "bob": BOB}[signer]
    h = header(metadata=meta) if meta else {k: v for k, v in header().items() if k != "metadata"}
    assert verify(TRUSTED, over_the_wire(signed(key, h, payload)), payload) == signer


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_flipped_payload_bit_is_caught(payload: bytes, data: st.DataObject) -> None:
    """Flipping any one bit of the payload makes verification fail."""
    h = signed(ALICE, header(), payload)
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    bad = bytearray(payload)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SignatureInvalidError):
        verify(TRUSTED, h, bytes(bad))
