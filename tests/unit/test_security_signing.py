"""Ed25519 message signatures: key files, trusted sets, sign/verify with real keys."""

from __future__ import annotations

import copy
import os
import shutil
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
from mesh.security.envelope import Opener
from mesh.security.payload import KeyRing, associated_data, encrypt
from mesh.security.signing import (
    REASONS,
    SignerStore,
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
    assert verify(TrustedKeys.load(tmp_path), over_the_wire(h), PAYLOAD, signer="alice") == "alice"


# ------------------------------------------------------------------ sign and verify


def test_valid_signature_names_the_signer() -> None:
    """A 64-byte signature verifies after the header crossed the wire, naming its signer."""
    h = signed(BOB, header())
    assert len(h["security"]["signature"]) == 64
    assert verify(TRUSTED, over_the_wire(h), PAYLOAD, signer="bob") == "bob"


def test_signature_covers_the_encrypted_payload_and_its_info() -> None:
    """Sign after encrypting: the ciphertext and the encryption map are both covered."""
    ring = KeyRing.generate()
    h = header()
    frame, info = encrypt(ring, PAYLOAD, associated_data(h, ring.active_kid))
    h["security"] = {"level": 3, "encryption": info}
    h = signed(ALICE, h, frame)
    assert verify(TRUSTED, over_the_wire(h), frame, signer="alice") == "alice"
    nonce = info["nonce"]
    h["security"]["encryption"]["nonce"] = bytes([nonce[0] ^ 1]) + nonce[1:]
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, frame, signer="alice")
    assert refusal(exc) == "does not verify"


def test_key_order_does_not_matter() -> None:
    """Signing bytes are canonical: a reordered header (at any depth) verifies the same."""
    h = signed(ALICE, header())
    reordered = {k: h[k] for k in reversed(list(h))}
    reordered["metadata"] = dict(reversed(list(h["metadata"].items())))
    reordered["security"] = dict(reversed(list(h["security"].items())))
    assert verify(TRUSTED, reordered, PAYLOAD, signer="alice") == "alice"


def test_signing_bytes_leave_out_the_signature_the_token_and_the_brokers_stamps() -> None:
    """Signature, token, `seq` and `sender` are not signed; the header comes first, then the payload."""
    h = header()
    plain = signing_bytes(h, PAYLOAD)
    assert signing_bytes(signed(ALICE, h), PAYLOAD) == plain
    assert signing_bytes({**h, "seq": 7, "sender": "alice"}, PAYLOAD) == plain
    assert plain.endswith(PAYLOAD)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(plain)
    assert next(unpacker)["security"] == {"level": 3}


@pytest.mark.parametrize(
    "change",
    [{"seq": 7}, {"sender": "alice"}, {"security": {"level": 3, "token": "eyJ.renewed.sig"}}],
    ids=["seq", "sender", "token"],
)
def test_what_the_broker_stamps_or_checks_may_change(change: dict[str, Any]) -> None:
    """An event the broker numbered and named, or a renewed token, still verifies."""
    h = over_the_wire(signed(ALICE, header()))
    sec = {**h["security"], **change.pop("security", {})}
    assert verify(TRUSTED, {**h, **change, "security": sec}, PAYLOAD, signer="alice") == "alice"


@pytest.mark.parametrize(
    ("path", "value"),
    [(("id",), "c0ffee02"), (("service",), "fs"), (("action",), "delete"), (("ts",), NOW + 1),
     (("metadata", "trace"), "t-2"), (("security", "level"), 1), (("deadline",), NOW + 5),
     (("security", "encryption"), {"kid": "k1"})],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_tampered_header_field_does_not_verify(path: tuple[str, ...], value: Any) -> None:
    """Changing or adding any signed header field (routing, time, metadata, level, encryption) is caught."""
    h = over_the_wire(signed(ALICE, header()))
    target = h
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD, signer="alice")
    assert refusal(exc) == "does not verify"


@pytest.mark.parametrize("payload", [PAYLOAD[:-1], PAYLOAD + b"\x00", b"\x00" + PAYLOAD[1:]],
                         ids=["truncated", "extended", "changed"])
def test_tampered_payload_does_not_verify(payload: bytes) -> None:
    """Any change to the payload frame is caught."""
    h = signed(ALICE, header())
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, payload, signer="alice")
    assert refusal(exc) == "does not verify"


def test_a_strangers_signature_does_not_verify() -> None:
    """A signature made with a key outside the store, sent by a trusted sender, is a forgery."""
    h = signed(MALLORY, header())
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD, signer="alice")
    assert refusal(exc) == "does not verify"


def test_a_sender_outside_the_store_is_an_unknown_signer() -> None:
    """A sender without a key in the store is refused as unknown, naming it."""
    h = signed(MALLORY, header())
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, h, PAYLOAD, signer="mallory")
    assert refusal(exc) == "unknown signer"
    assert exc.value.details["signer"] == "mallory"


def test_nobody_is_known_to_an_empty_trust_set() -> None:
    """An empty trusted set refuses every signature as from an unknown signer."""
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TrustedKeys({}), signed(ALICE, header()), PAYLOAD, signer="alice")
    assert refusal(exc) == "unknown signer"


def test_no_sender_is_refused_before_any_key_is_tried() -> None:
    """A valid signature with nobody saying who sent it (no broker stamp) is refused."""
    with pytest.raises(SignatureInvalidError) as exc:
        verify(TRUSTED, signed(ALICE, header()), PAYLOAD, signer=None)
    assert refusal(exc) == "missing sender"


def test_only_the_senders_key_is_checked() -> None:
    """Alice's valid signature on a message Bob's link sent does not verify."""
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
        verify(TRUSTED, h, PAYLOAD, signer="alice")
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
        verify(TRUSTED, h, PAYLOAD, signer="alice")
    assert refusal(exc) == "missing"


# ------------------------------------------------------------------ the trust store


def _store_dir(tmp_path: Path, *keys: tuple[str, SigningKey]) -> Path:
    root = tmp_path / "trusted"
    root.mkdir(exist_ok=True)
    for name, key in keys:
        (root / f"{name}.pub").write_text(bytes(key.verify_key).hex() + "\n")
    return root


def test_the_store_sees_a_key_added_and_one_removed(tmp_path: Path) -> None:
    """A signer added to the directory is known at the next check; a removed one is forgotten."""
    root = _store_dir(tmp_path, ("alice", ALICE))
    store = SignerStore(root, interval=1.0)
    assert "alice" in store.current(0.0) and "bob" not in store.current(0.0)
    _store_dir(tmp_path, ("bob", BOB))
    assert "bob" not in store.current(0.5)  # checks at most once per interval
    assert "bob" in store.current(1.0)
    (root / "alice.pub").unlink()
    assert "alice" not in store.current(2.0)


def test_a_replaced_key_takes_effect(tmp_path: Path) -> None:
    """Replacing a signer's key file (same name) makes the new key the one checked."""
    root = _store_dir(tmp_path, ("alice", ALICE))
    store = SignerStore(root)
    h = signed(MALLORY, header())
    with pytest.raises(SignatureInvalidError):
        verify(store.current(0.0), h, PAYLOAD, signer="alice")
    tmp = tmp_path / "new.pub"
    tmp.write_text(bytes(MALLORY.verify_key).hex() + "\n")
    os.replace(tmp, root / "alice.pub")
    assert verify(store.current(1.0), h, PAYLOAD, signer="alice") == "alice"


def test_a_bad_new_file_keeps_the_last_good_keys(tmp_path: Path) -> None:
    """A broken key file added later keeps the store's last good keys and sets `error`."""
    root = _store_dir(tmp_path, ("alice", ALICE))
    store = SignerStore(root)
    (root / "typo.pub").write_text("not hex\n")
    assert "alice" in store.current(1.0)
    assert store.error is not None and store.error.details["path"].endswith("typo.pub")
    (root / "typo.pub").unlink()
    store.current(2.0)
    assert store.error is None


def test_a_store_needs_its_directory(tmp_path: Path) -> None:
    """A missing trust store directory is a configuration error at start."""
    with pytest.raises(ConfigurationError):
        SignerStore(tmp_path / "absent")
    root = _store_dir(tmp_path, ("alice", ALICE))
    store = SignerStore(root)
    shutil.rmtree(root)
    assert "alice" in store.current(1.0) and store.error is not None


# ------------------------------------------------------------------ the receiving half


def test_a_level_3_claim_is_checked_by_every_opener(tmp_path: Path) -> None:
    """Level 3 is verified whether or not the receiver requires signers; level 1 is not."""
    opener = Opener(signers=SignerStore(_store_dir(tmp_path, ("alice", ALICE))))
    h = over_the_wire(signed(ALICE, header()))
    assert opener.open(h, PAYLOAD, 0.0, "alice") == PAYLOAD
    with pytest.raises(SignatureInvalidError) as exc:
        opener.open(h, PAYLOAD, 0.0, "bob")
    assert refusal(exc) == "unknown signer"
    unsigned = header(security={"level": 1, "token": "eyJ.token.sig"})
    assert opener.open(unsigned, PAYLOAD, 0.0, None) == PAYLOAD


@pytest.mark.parametrize("sender", [None, "alice"])
def test_an_opener_without_a_store_refuses_every_signature(sender: str | None) -> None:
    """A receiver with nothing configured (security off) never takes a level-3 claim as checked."""
    with pytest.raises(SignatureInvalidError) as exc:
        Opener().open(over_the_wire(signed(ALICE, header())), PAYLOAD, 0.0, sender)
    assert refusal(exc) == ("missing sender" if sender is None else "unknown signer")


def test_required_signers_restrict_further(tmp_path: Path) -> None:
    """With required signers, a valid signature of another trusted signer is refused, and so
    is an unsigned message."""
    store = SignerStore(_store_dir(tmp_path, ("alice", ALICE), ("bob", BOB)))
    opener = Opener(signers=store, required_signers=TrustedKeys({"alice": ALICE.verify_key}))
    assert opener.open(signed(ALICE, header()), PAYLOAD, 0.0, "alice") == PAYLOAD
    with pytest.raises(SignatureInvalidError) as exc:
        opener.open(signed(BOB, header()), PAYLOAD, 0.0, "bob")
    assert refusal(exc) == "signer not required"
    with pytest.raises(SignatureInvalidError) as exc:
        opener.open(header(security={"level": 1}), PAYLOAD, 0.0, "alice")
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
    assert verify(TRUSTED, over_the_wire(signed(key, h, payload)), payload, signer=signer) == signer


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_flipped_payload_bit_is_caught(payload: bytes, data: st.DataObject) -> None:
    """Flipping any one bit of the payload makes verification fail."""
    h = signed(ALICE, header(), payload)
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    bad = bytearray(payload)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SignatureInvalidError):
        verify(TRUSTED, h, bytes(bad), signer="alice")
