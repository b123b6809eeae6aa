"""AES-256-GCM payload encryption and the key ring: real crypto, ring files in tmp_path."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mesh.protocol import (
    ConfigurationError,
    EncryptionFailedError,
    canonical,
    encode_command_header,
    encode_event_header,
    encode_payload,
    encode_stamped_event,
    unpack_header,
)
from mesh.security.payload import (
    REASONS,
    KeyRing,
    KeyRingFile,
    associated_data,
    decrypt,
    encrypt,
)

NOW = 1_700_000_000.0
SECRET = b"attack at dawn: the plaintext nobody else may read"


def command_header(**changes: Any) -> dict[str, Any]:
    header = unpack_header(encode_command_header("kv", "put", id="c0ffee01", now=NOW))
    header.update(changes)
    return header


def seal(ring: KeyRing, header: dict[str, Any], payload: bytes = SECRET) -> tuple[bytes, dict[str, Any]]:
    return encrypt(ring, payload, associated_data(header, ring.active_kid))


def open_(ring: KeyRing, header: dict[str, Any], frame: bytes, info: Any) -> bytes:
    kid = info.get("kid") if isinstance(info, dict) else None
    return decrypt(ring, frame, info, associated_data(header, kid))


def refusal(exc_info: pytest.ExceptionInfo[EncryptionFailedError]) -> str:
    err = exc_info.value
    assert err.code == 2003
    assert err.details["reason"] in REASONS
    # Neither plaintext nor key bytes may leak into what a peer or a log would see.
    shown = repr((err.message, err.details))
    assert "attack" not in shown
    return err.details["reason"]


# ------------------------------------------------------------------ round trips


def test_round_trip_restores_the_payload_frame() -> None:
    """A payload encrypted for a header decrypts to the same bytes with that header."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header, encode_payload({"key": "k", "value": SECRET}))
    assert msgpack.unpackb(open_(ring, header, frame, info)) == {"key": "k", "value": SECRET}


def test_info_map_has_algorithm_key_id_and_a_fresh_nonce() -> None:
    """Each message gets its own 12-byte nonce; the ciphertext is plaintext + 16-byte tag."""
    ring = KeyRing.generate()
    header = command_header()
    frame1, info1 = seal(ring, header)
    frame2, info2 = seal(ring, header)
    assert info1.keys() == {"alg", "kid", "nonce"}
    assert info1["alg"] == "A256GCM" and info1["kid"] == ring.active_kid
    assert len(info1["nonce"]) == 12 and info1["nonce"] != info2["nonce"]
    assert len(frame1) == len(SECRET) + 16 and frame1 != frame2
    assert SECRET not in frame1


def test_empty_payload_round_trips() -> None:
    """A zero-length frame still authenticates (the tag alone)."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header, b"")
    assert open_(ring, header, frame, info) == b""


def test_round_trip_through_the_wire_header() -> None:
    """The info map survives MessagePack in `security.encryption` and still decrypts."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header)
    header["security"] = {"level": 2, "encryption": info}
    received = unpack_header(msgpack.packb(header, use_bin_type=True))
    assert open_(ring, received, frame, received["security"]["encryption"]) == SECRET


def test_fields_the_broker_may_stamp_are_not_authenticated() -> None:
    """The broker's `seq` on events does not break decryption; ts and metadata are not bound."""
    ring = KeyRing.generate()
    published = unpack_header(encode_event_header("jobs.done", id="e1", now=NOW))
    frame, info = seal(ring, published)
    stamped = unpack_header(encode_stamped_event(published, 7))
    assert open_(ring, stamped, frame, info) == SECRET


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("where", [0, -1, -16], ids=["first-byte", "last-byte", "first-tag-byte"])
def test_tampered_ciphertext_is_refused(where: int) -> None:
    """One flipped bit anywhere in ciphertext or tag fails authentication."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header)
    bad = bytearray(frame)
    bad[where] ^= 0x01
    with pytest.raises(EncryptionFailedError) as exc:
        open_(ring, header, bytes(bad), info)
    assert refusal(exc) == "tampered or wrong key"


def test_truncated_ciphertext_is_refused() -> None:
    """A frame shorter than the tag cannot authenticate."""
    ring = KeyRing.generate()
    header = command_header()
    _, info = seal(ring, header)
    with pytest.raises(EncryptionFailedError) as exc:
        open_(ring, header, b"short", info)
    assert refusal(exc) == "tampered or wrong key"


def test_tampered_nonce_is_refused() -> None:
    """A changed nonce decrypts to garbage, which the tag catches."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header)
    info["nonce"] = bytes([info["nonce"][0] ^ 0x80]) + info["nonce"][1:]
    with pytest.raises(EncryptionFailedError) as exc:
        open_(ring, header, frame, info)
    assert refusal(exc) == "tampered or wrong key"


@pytest.mark.parametrize(
    ("field", "value"),
    [("id", "c0ffee02"), ("service", "fs"), ("action", "delete"), ("type", "event"),
     ("correlation_id", "c0ffee00"), ("topic", "jobs")],
)
def test_tampered_authenticated_header_field_is_refused(field: str, value: str) -> None:
    """Relabelling a message (or adding a field it did not have) breaks decryption."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header)
    with pytest.raises(EncryptionFailedError) as exc:
        open_(ring, command_header(**{field: value}), frame, info)
    assert refusal(exc) == "tampered or wrong key"


def test_response_cannot_be_redirected_to_another_command() -> None:
    """An encrypted reply to one command does not decrypt as the reply to another."""
    ring = KeyRing.generate()
    reply = {"v": 1, "type": "response", "id": "r1", "ts": NOW, "correlation_id": "cmd-1"}
    frame, info = seal(ring, reply)
    with pytest.raises(EncryptionFailedError) as exc:
        open_(ring, {**reply, "correlation_id": "cmd-2"}, frame, info)
    assert refusal(exc) == "tampered or wrong key"


def test_key_id_is_authenticated() -> None:
    """AAD made for another key id fails even with the right key."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header)
    with pytest.raises(EncryptionFailedError) as exc:
        decrypt(ring, frame, info, associated_data(header, "other"))
    assert refusal(exc) == "tampered or wrong key"


def test_wrong_key_under_the_same_id_is_refused() -> None:
    """A ring holding a different key under the same id cannot decrypt."""
    ring = KeyRing.generate()
    impostor = KeyRing({ring.active_kid: os.urandom(32)}, ring.active_kid)
    header = command_header()
    frame, info = seal(ring, header)
    with pytest.raises(EncryptionFailedError) as exc:
        open_(impostor, header, frame, info)
    assert refusal(exc) == "tampered or wrong key"


def test_unknown_key_id_is_named() -> None:
    """A key id the ring does not hold is refused, and the (non-secret) id is reported."""
    sender, receiver = KeyRing.generate(), KeyRing.generate()
    header = command_header()
    frame, info = seal(sender, header)
    with pytest.raises(EncryptionFailedError) as exc:
        open_(receiver, header, frame, info)
    assert refusal(exc) == "unknown key id"
    assert exc.value.details["kid"] == sender.active_kid


@pytest.mark.parametrize(
    "change",
    [
        lambda i: "not a map",
        lambda i: {k: v for k, v in i.items() if k != "alg"},
        lambda i: {**i, "alg": "A128GCM"},
        lambda i: {k: v for k, v in i.items() if k != "kid"},
        lambda i: {**i, "kid": 7},
        lambda i: {**i, "kid": ""},
        lambda i: {**i, "kid": "k" * 65},
        lambda i: {k: v for k, v in i.items() if k != "nonce"},
        lambda i: {**i, "nonce": i["nonce"][:11]},
        lambda i: {**i, "nonce": i["nonce"].hex()},
    ],
    ids=["not-a-map", "no-alg", "other-alg", "no-kid", "int-kid", "empty-kid", "long-kid",
         "no-nonce", "short-nonce", "str-nonce"],
)
def test_malformed_info_is_refused(change: Any) -> None:
    """An encryption map that `encrypt` could not have written is refused as malformed."""
    ring = KeyRing.generate()
    header = command_header()
    frame, info = seal(ring, header)
    with pytest.raises(EncryptionFailedError) as exc:
        decrypt(ring, frame, change(info), associated_data(header, ring.active_kid))
    assert refusal(exc) == "malformed"


def test_associated_data_is_canonical() -> None:
    """The AAD does not depend on the order of the header's keys."""
    header = command_header(correlation_id="x")
    reordered = dict(reversed(list(header.items())))
    assert associated_data(header, "k1") == associated_data(reordered, "k1")
    assert associated_data(header, "k1") != associated_data(header, "k2")
    expected = {k: header[k] for k in ("id", "type", "service", "action", "correlation_id")}
    assert associated_data(header, "k1") == msgpack.packb(canonical({**expected, "kid": "k1"}))


# ------------------------------------------------------------------ rotation


def test_rotation_keeps_old_messages_readable_for_the_grace_period() -> None:
    """After rotate: the new key encrypts, the old decrypts until pruned at now+grace."""
    ring = KeyRing.generate()
    old = ring.active_kid
    header = command_header()
    old_frame, old_info = seal(ring, header)

    new = ring.rotate(NOW, grace=60.0)
    assert new != old and ring.active_kid == new
    assert ring.retire_at(old) == NOW + 60.0 and ring.retire_at(new) is None
    assert open_(ring, header, old_frame, old_info) == SECRET
    new_frame, new_info = seal(ring, header)
    assert new_info["kid"] == new
    assert open_(ring, header, new_frame, new_info) == SECRET

    assert ring.prune(NOW + 59.9) == [] and old in ring
    assert ring.prune(NOW + 60.0) == [old]
    assert list(ring) == [new]
    with pytest.raises(EncryptionFailedError) as exc:
        open_(ring, header, old_frame, old_info)
    assert refusal(exc) == "unknown key id"
    assert open_(ring, header, new_frame, new_info) == SECRET


def test_prune_never_removes_the_active_key() -> None:
    """However late, a pruned ring still holds its active key."""
    ring = KeyRing.generate()
    ring.rotate(NOW, 0.0)
    ring.rotate(NOW + 1, 5.0)
    assert len(ring) == 3
    assert len(ring.prune(NOW + 1e9)) == 2
    assert list(ring) == [ring.active_kid]


def test_rotation_refuses_a_negative_grace() -> None:
    """A grace period must be a finite, non-negative number of seconds."""
    ring = KeyRing.generate()
    with pytest.raises(ValueError):
        ring.rotate(NOW, -1.0)
    with pytest.raises(ValueError):
        ring.rotate(NOW, float("inf"))


@pytest.mark.parametrize(
    ("keys", "active", "retire"),
    [({"a": b"x" * 31}, "a", None), ({"a": b"x" * 32}, "b", None),
     ({"": b"x" * 32}, "", None), ({"a": b"x" * 32}, "a", {"a": NOW})],
    ids=["short-key", "active-missing", "empty-kid", "active-retires"],
)
def test_invalid_ring_is_refused(keys: dict[str, bytes], active: str, retire: Any) -> None:
    """A ring is built only from 32-byte keys, short ids and a present, non-retiring active key."""
    with pytest.raises(ConfigurationError):
        KeyRing(keys, active, retire)


def test_repr_shows_key_ids_only() -> None:
    """A ring in a log line or a traceback shows no key bytes."""
    ring = KeyRing.generate()
    key = ring._entries[ring.active_kid].key
    assert ring.active_kid in repr(ring)
    assert key.hex() not in repr(ring) and repr(key) not in repr(ring)


# ------------------------------------------------------------------ ring files


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """A saved ring, loaded elsewhere, decrypts what the original encrypted, old keys included."""
    ring = KeyRing.generate()
    header = command_header()
    old_frame, old_info = seal(ring, header)
    ring.rotate(NOW, 300.0)
    path = tmp_path / "ring.json"
    ring.save(path)

    loaded = KeyRing.load(path)
    assert loaded.active_kid == ring.active_kid and sorted(loaded) == sorted(ring)
    assert loaded.retire_at(old_info["kid"]) == NOW + 300.0
    assert open_(loaded, header, old_frame, old_info) == SECRET
    frame, info = seal(loaded, header)
    assert open_(ring, header, frame, info) == SECRET


def test_saved_file_is_json_with_base64_keys(tmp_path: Path) -> None:
    """The documented format: version, active id, base64 keys and retire times."""
    ring = KeyRing.generate()
    path = tmp_path / "ring.json"
    ring.save(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["active"] == ring.active_kid
    entry = doc["keys"][ring.active_kid]
    assert entry["retire_at"] is None and len(entry["key"]) == 44  # base64 of 32 bytes


def test_save_is_owner_only_and_atomic(tmp_path: Path) -> None:
    """The file is 0600 even when replacing a looser one; it is replaced, not rewritten."""
    path = tmp_path / "ring.json"
    path.write_text("old")
    path.chmod(0o644)
    before = path.stat().st_ino
    with open(path) as reader:  # a reader holding the old file keeps seeing it whole
        KeyRing.generate().save(path)
        assert reader.read() == "old"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != before
    assert os.listdir(tmp_path) == ["ring.json"]  # no temporary file left behind


def test_failed_save_is_a_configuration_error_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A save that cannot replace its target raises ConfigurationError and cleans up."""
    target = tmp_path / "ring.json"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(ConfigurationError) as exc:
        KeyRing.generate().save(target)
    assert exc.value.details["path"] == str(target)
    assert os.listdir(tmp_path) == ["ring.json"] and target.is_dir()


def test_save_into_a_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    """The ring's directory must exist; nothing is created on the way."""
    with pytest.raises(ConfigurationError):
        KeyRing.generate().save(tmp_path / "absent" / "ring.json")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json",
        "[]",
        '{"version": 2, "active": "a", "keys": {}}',
        '{"version": 1, "active": "a", "keys": {"a": {"key": "!!!", "retire_at": null}}}',
        '{"version": 1, "active": "a", "keys": {"a": {"key": "AAAA", "retire_at": null}}}',
        '{"version": 1, "active": "b", "keys": {"a": {"key": "%s", "retire_at": null}}}',
        '{"version": 1, "active": "a", "keys": {"a": {"key": "%s"}}}',
        '{"version": 1, "active": "a", "keys": {"a": {"key": "%s", "retire_at": "soon"}}}',
    ],
    ids=["empty", "not-json", "not-a-map", "version", "bad-base64", "short-key",
         "active-missing", "no-retire", "bad-retire"],
)
def test_invalid_ring_file_is_a_configuration_error(tmp_path: Path, content: str) -> None:
    """A bad file names its path and a reason, never its content."""
    key = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="  # base64 of 32 bytes
    path = tmp_path / "ring.json"
    path.write_text(content.replace("%s", key))
    with pytest.raises(ConfigurationError) as exc:
        KeyRing.load(path)
    assert exc.value.details["path"] == str(path)
    assert key not in str(exc.value) and key not in repr(exc.value.details)


def test_missing_ring_file_is_a_configuration_error(tmp_path: Path) -> None:
    """Loading a ring that does not exist says so with the path."""
    with pytest.raises(ConfigurationError) as exc:
        KeyRing.load(tmp_path / "absent.json")
    assert exc.value.details["path"].endswith("absent.json")


def test_ring_file_picks_up_a_rotation(tmp_path: Path) -> None:
    """A running process sees `mesh keys rotate` at its next check, old messages still open."""
    path = tmp_path / "ring.json"
    KeyRing.generate().save(path)
    watched = KeyRingFile(path, interval=1.0)
    ring = watched.current(0.0)
    header = command_header()
    frame, info = seal(ring, header)

    operator = KeyRing.load(path)  # another process: `mesh keys rotate`
    new = operator.rotate(NOW, 60.0)
    operator.save(path)

    assert watched.current(0.5).active_kid == ring.active_kid  # not checked yet
    reloaded = watched.current(1.0)
    assert reloaded.active_kid == new and watched.error is None
    assert open_(reloaded, header, frame, info) == SECRET
    assert seal(reloaded, header)[1]["kid"] == new


def test_ring_file_is_not_reread_when_unchanged(tmp_path: Path) -> None:
    """Checks of an unchanged file keep the same ring object (no read, no parse)."""
    path = tmp_path / "ring.json"
    KeyRing.generate().save(path)
    watched = KeyRingFile(path, interval=0.0)
    first = watched.current(0.0)
    assert all(watched.current(t) is first for t in (1.0, 2.0, 3.0))


def test_ring_file_keeps_the_last_good_ring(tmp_path: Path) -> None:
    """A deleted or broken file leaves the running ring in place and reports an error."""
    path = tmp_path / "ring.json"
    KeyRing.generate().save(path)
    watched = KeyRingFile(path, interval=0.0)
    good = watched.current(0.0)

    path.unlink()
    assert watched.current(1.0) is good
    assert isinstance(watched.error, ConfigurationError)

    path.write_text("{broken")
    assert watched.current(2.0) is good
    assert watched.error is not None and watched.error.details["reason"]

    fixed = KeyRing.generate()
    fixed.save(path)
    assert watched.current(3.0).active_kid == fixed.active_kid
    assert watched.error is None


def test_ring_file_must_exist_at_start(tmp_path: Path) -> None:
    """A process started without its ring fails at once, not at the first message."""
    with pytest.raises(ConfigurationError):
        KeyRingFile(tmp_path / "absent.json")


def test_delayed_rotation_lets_every_reader_learn_the_key_before_it_encrypts(tmp_path: Path) -> None:
    """A key rotated in with a delay decrypts at once, encrypts only from active_from, and survives save/load."""
    path = tmp_path / "ring.json"
    ring = KeyRing.generate()
    old = ring.active_kid
    ring.save(path)
    reader = KeyRingFile(path, interval=0.0)
    new = ring.rotate(NOW, grace=30.0, delay=5.0)
    assert ring.active_kid == old and new in ring
    ring.save(path)
    early = reader.current(NOW + 1)
    assert early.active_kid == old and new in early  # can decrypt the new key's messages already
    late = reader.current(NOW + 6)
    assert late.active_kid == new
    frame, info = encrypt(late, b"\x01", associated_data({"id": "m", "type": "command"}, late.active_kid))
    assert decrypt(early, frame, info, associated_data({"id": "m", "type": "command"}, info["kid"])) == b"\x01"
    assert KeyRing.load(path).prune(NOW + 6 + 31) == [old]


def test_rotations_count_up_in_the_file_and_the_metadata_holds_no_key(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = KeyRing.generate()
    ring.rotate(100.0, grace=10.0, delay=5.0)
    ring.rotate(200.0, grace=10.0)
    ring.save(path)
    loaded = KeyRing.load(path)
    meta = loaded.metadata()
    assert loaded.generation == meta["generation"] == 2 and meta["active"] == ring.active_kid
    assert all(set(times) == {"active_from", "retire_at"} for times in meta["keys"].values())
    assert all(json.loads(path.read_text())["keys"][kid]["key"] not in json.dumps(meta) for kid in meta["keys"])
    msgpack.packb(meta)  # what a broker cluster replicates


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc, kid: doc["keys"][kid].update(retire_at=2**1100),  # past what a float holds
        lambda doc, kid: doc["keys"][kid].update(active_from=2**1100),
        lambda doc, kid: doc["keys"].update({"\ud800": doc["keys"][kid]}),  # not encodable
        lambda doc, kid: doc.update(generation=-1),
        lambda doc, kid: doc.update(generation=True),
    ],
    ids=["huge-retire", "huge-active-from", "surrogate-kid", "negative-generation", "bool-generation"],
)
def test_a_hand_edited_ring_file_out_of_range_is_refused_as_invalid(tmp_path: Path, edit: Any) -> None:
    path = tmp_path / "keyring.json"
    ring = KeyRing.generate()
    ring.save(path)
    doc = json.loads(path.read_text())
    edit(doc, ring.active_kid)
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError):
        KeyRing.load(path)
