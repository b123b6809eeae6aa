"""End-to-end payload encryption (AES-256-GCM) between a client and a node, and its key ring.

Rules of this module:

* The broker never holds these keys: it routes on the header and forwards the payload
  frame, which is ciphertext when `security.level` >= 2. Only clients and nodes that
  share a key ring can read it.
* What is encrypted is the payload frame's bytes, as they are; what is authenticated
  besides them is `associated_data(header, kid)`: the header fields nobody on the way
  may change (id, type, service, action, topic, correlation_id) and the key id. A
  broker that relabels a command, or answers one command with another's encrypted
  reply, makes decryption fail.
* Every message gets a fresh random 96-bit nonce. With random nonces NIST SP 800-38D
  allows at most 2**32 messages per key, which is why keys rotate: `mesh keys rotate`
  adds a new key that becomes active only after a delay (`active_from`), so that every
  client and node has re-read the ring and can decrypt with it before anyone encrypts
  with it; the old key keeps decrypting for a grace period after that. No message in
  flight fails.
* A ring is a plain object with no clock: `rotate` and `prune` take `now`. Only
  `KeyRing.save`/`load` and `KeyRingFile` touch the file system.
* cryptography's `InvalidTag` never leaves this module; every failure is an
  `EncryptionFailedError` whose `details["reason"]` is one of `REASONS`. Key material
  and plaintext never appear in messages, details or reprs.

The key-ring file is JSON, written atomically (temporary file + `os.replace`) with mode
0600::

    {
      "version": 1,
      "active": "3f9a0c12",
      "keys": {
        "3f9a0c12": {"key": "<base64 of 32 bytes>", "retire_at": null},
        "0b1c2d3e": {"key": "<base64 of 32 bytes>", "retire_at": 1767225600.0},
        "77aa01fe": {"key": "<base64 of 32 bytes>", "retire_at": null, "active_from": 1767225300.0}
      }
    }

`retire_at` is a Unix time in seconds after which `prune` removes the key (`null`:
never; the active key always has `null`). `active_from`, on a key added by a rotation,
is when it takes over from `active` (`promote`).
"""

from __future__ import annotations

import base64
import json
import math
import os
import secrets
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..protocol import ConfigurationError, EncryptionFailedError
from .files import write_file_atomic

__all__ = [
    "ALGORITHM",
    "KEY_BYTES",
    "NONCE_BYTES",
    "REASONS",
    "KeyRing",
    "KeyRingFile",
    "associated_data",
    "decrypt",
    "encrypt",
]

ALGORITHM: Final = "A256GCM"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
REASONS: Final = ("unknown key id", "tampered or wrong key", "malformed")
_MAX_KID_LENGTH: Final = 64
_FILE_VERSION: Final = 1

# The header fields a message keeps from sender to receiver, in sorted order with the
# key id's place marked, so the AAD map is canonical without a sort per message. `seq`
# is left out on purpose: the broker stamps it on events. `ts`, `deadline` and
# `metadata` are not facts the payload depends on; a signature (signing.py) covers them.
_AAD_KEYS: Final = ("action", "correlation_id", "id", "kid", "service", "topic", "type")


@dataclass(slots=True)
class _Entry:
    key: bytes = field(repr=False)
    retire_at: float | None
    aead: AESGCM = field(repr=False)  # built once per key: costs more than a small message
    active_from: float | None = None  # a rotated-in key: when it becomes the active one


class KeyRing:
    """Key id -> 256-bit key; the active key encrypts, every key still held decrypts.

    Args:
        keys: key id -> 32 raw key bytes.
        active: the id of the key that encrypts; must be in `keys`.
        retire_at: key id -> Unix time after which `prune` removes that key; keys not
            listed are kept until listed. The active key retires only once a rotated-in
            key has replaced it.
        active_from: key id -> Unix time at which that rotated-in key becomes active.
        generation: how many rotations made this ring; orders copies of it (a broker
            cluster keeps the highest it has seen).

    Raises:
        ConfigurationError: a key is not 32 bytes, a key id is empty or too long, the
            active key is missing or has a retire time.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active: str,
        retire_at: Mapping[str, float] | None = None,
        active_from: Mapping[str, float] | None = None,
        generation: int = 0,
    ) -> None:
        retire = dict(retire_at or {})
        if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation < 2**53:
            raise _config("the key ring's generation must be a whole number >= 0")
        self.generation = generation
        if active not in keys:
            raise _config("the active key id is not in the key ring")
        if active in retire and not active_from:
            raise _config("the active key of a key ring cannot have a retire time")
        self._entries: dict[str, _Entry] = {}
        for kid, key in keys.items():
            self._add(kid, key, retire.get(kid))
        for kid, start in (active_from or {}).items():
            if kid not in self._entries or not _is_time(start):
                raise _config(f"key {kid} has an invalid active_from")
            self._entries[kid].active_from = float(start)
        self._active = active

    @classmethod
    def generate(cls) -> KeyRing:
        """A new ring holding one fresh random active key."""
        kid = _new_kid(())
        return cls({kid: AESGCM.generate_key(bit_length=256)}, kid)

    @property
    def active_kid(self) -> str:
        """The id of the key `encrypt` uses; pass it to `associated_data` when encrypting."""
        return self._active

    def __contains__(self, kid: object) -> bool:
        return kid in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # never the keys themselves
        return f"KeyRing(active={self._active!r}, kids={sorted(self._entries)!r})"

    def metadata(self) -> dict[str, Any]:
        """The ring without its keys: the active id, and each key's activation and
        retirement times (what a broker cluster shares, `mesh.cluster.shared`)."""
        return {
            "generation": self.generation,
            "active": self._active,
            "keys": {kid: {"active_from": e.active_from, "retire_at": e.retire_at} for kid, e in sorted(self._entries.items())},
        }

    def retire_at(self, kid: str) -> float | None:
        """When `prune` will remove `kid` (None: not scheduled).

        Raises:
            KeyError: `kid` is not in the ring.
        """
        return self._entries[kid].retire_at

    def rotate(self, now: float, grace: float, delay: float = 0.0) -> str:
        """Add a new key that becomes active at `now + delay`; the previous one keeps
        decrypting until `grace` seconds after that.

        A `delay` longer than every reader's check interval (`KeyRingFile`) means every
        client and node can decrypt with the new key before anyone encrypts with it.
        Grace covers the messages still in flight when the switch happens.

        Args:
            now: the current Unix time.
            grace: seconds the previous active key stays usable after the switch.
            delay: seconds until the new key takes over (0: at once).

        Returns:
            The new key id.

        Raises:
            ValueError: `grace` or `delay` is negative or not finite.
        """
        if not math.isfinite(grace) or grace < 0 or not math.isfinite(delay) or delay < 0:
            raise ValueError("grace and delay must be finite numbers of seconds >= 0")
        kid = _new_kid(self._entries)
        self._add(kid, AESGCM.generate_key(bit_length=256), None)
        self.generation += 1
        self._entries[kid].active_from = now + delay
        self._entries[self._active].retire_at = now + delay + grace
        self.promote(now)
        return kid

    def promote(self, now: float) -> str:
        """Make the newest rotated-in key whose time has come the active one.

        Returns:
            The active key id after the promotion.
        """
        due = [(e.active_from, kid) for kid, e in self._entries.items() if e.active_from is not None and e.active_from <= now]
        if due:
            _, kid = max(due)
            for entry in self._entries.values():
                if entry.active_from is not None and entry.active_from <= now:
                    entry.active_from = None
            self._active = kid
            self._entries[kid].retire_at = None
        return self._active

    def prune(self, now: float) -> list[str]:
        """Remove the keys whose retire time is at or before `now`; never the active key.

        Returns:
            The removed key ids, sorted.
        """
        self.promote(now)
        gone = sorted(
            kid for kid, e in self._entries.items()
            if e.retire_at is not None and e.retire_at <= now and kid != self._active
        )
        for kid in gone:
            del self._entries[kid]
        return gone

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ring as JSON, atomically, readable by its owner only (mode 0600).

        Readers (`KeyRingFile`) see either the old file or the new one, never half.

        Raises:
            ConfigurationError: the file cannot be written.
        """
        doc = {
            "version": _FILE_VERSION,
            "generation": self.generation,
            "active": self._active,
            "keys": {
                kid: {
                    "key": base64.b64encode(e.key).decode("ascii"),
                    "retire_at": e.retire_at,
                    **({"active_from": e.active_from} if e.active_from is not None else {}),
                }
                for kid, e in sorted(self._entries.items())
            },
        }
        write_file_atomic(Path(path), (json.dumps(doc, indent=2) + "\n").encode("ascii"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Read a ring written by `save`.

        Raises:
            ConfigurationError: the file cannot be read or is not a valid ring;
                `details` has the path and a reason, never key material.
        """
        return _read_ring(Path(path))[0]

    def _add(self, kid: object, key: object, retire_at: float | None) -> None:
        if not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID_LENGTH or not kid.isprintable() or not kid.isascii():
            raise _config(f"a key id must be a string of 1 to {_MAX_KID_LENGTH} printable ASCII characters")
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise _config(f"key {kid} is not {KEY_BYTES} bytes")
        if retire_at is not None and not _is_time(retire_at):
            raise _config(f"key {kid} has an invalid retire time")
        self._entries[kid] = _Entry(key, None if retire_at is None else float(retire_at), AESGCM(key))


class KeyRingFile:
    """A ring file that a running client or node re-reads when `mesh keys rotate` changed it.

    A check is one `stat` call, made at most once per `interval` seconds; the file is
    read again only when its inode, size or modification time changed (`save` replaces
    the file, so every save gives a new inode). A file that has become unreadable or
    invalid keeps the last good ring in use and sets `error` for the loop to log.

    Args:
        path: the ring file.
        interval: the least time between two checks, in the unit of `now`.

    Raises:
        ConfigurationError: the file cannot be read at start.
    """

    def __init__(self, path: str | os.PathLike[str], *, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self.error: ConfigurationError | None = None
        self._ring, self._stamp = _read_ring(self.path)
        self._next_check = -math.inf

    def current(self, now: float) -> KeyRing:
        """The ring to use now, re-read first when the file changed since the last check.

        Args:
            now: the Unix time: checks happen at most once per `interval`, and a key
                rotated in becomes active once its `active_from` has come.
        """
        if now >= self._next_check:
            self._next_check = now + self.interval
            try:
                if _stamp(os.stat(self.path)) != self._stamp:
                    self._ring, self._stamp = _read_ring(self.path)
                self.error = None
                self._ring.promote(now)
            except OSError:
                self.error = _config("cannot read the key ring", self.path)
            except ConfigurationError as exc:
                self.error = exc
        return self._ring


def encrypt(ring: KeyRing, payload_frame: bytes, aad: bytes) -> tuple[bytes, dict[str, Any]]:
    """Encrypt a payload frame with the ring's active key and a fresh random nonce.

    Args:
        ring: the sender's key ring.
        payload_frame: the plaintext payload frame (MessagePack bytes).
        aad: `associated_data(header, ring.active_kid)`.

    Returns:
        The ciphertext frame (the plaintext's length plus a 16-byte tag) and the map to
        put in the header's `security.encryption`:
        `{"alg": "A256GCM", "kid": str, "nonce": 12 bytes}`.
    """
    kid = ring.active_kid
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = ring._entries[kid].aead.encrypt(nonce, payload_frame, aad)
    return ciphertext, {"alg": ALGORITHM, "kid": kid, "nonce": nonce}


def decrypt(ring: KeyRing, frame: bytes, info: object, aad: bytes) -> bytes:
    """Decrypt and authenticate a payload frame.

    Keys past their retire time still decrypt until `prune` removes them.

    Args:
        ring: the receiver's key ring.
        frame: the ciphertext payload frame.
        info: the header's `security.encryption` map, straight from the wire.
        aad: `associated_data(header, info["kid"])` of the received header.

    Returns:
        The plaintext payload frame.

    Raises:
        EncryptionFailedError: `details["reason"]` is "malformed" (the info map is not
            what `encrypt` writes), "unknown key id" (`details["kid"]` names it; a key
            id is not secret) or "tampered or wrong key" (ciphertext, nonce or
            authenticated header fields changed, or the key differs).
    """
    if not isinstance(info, dict):
        raise _failed("malformed", "the encryption info is not a map")
    kid = info.get("kid")
    nonce = info.get("nonce")
    if info.get("alg") != ALGORITHM:
        raise _failed("malformed", f"the algorithm is not {ALGORITHM}")
    if not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID_LENGTH:
        raise _failed("malformed", "the key id is not a short string")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise _failed("malformed", f"the nonce is not {NONCE_BYTES} bytes")
    entry = ring._entries.get(kid)
    if entry is None:
        raise _failed("unknown key id", "the key id is not in the key ring", kid=kid)
    try:
        return entry.aead.decrypt(nonce, frame, aad)
    except InvalidTag:
        raise _failed("tampered or wrong key", "the payload does not authenticate") from None


def associated_data(header_map: Mapping[str, Any], kid: str) -> bytes:
    """The bytes AES-GCM authenticates besides the payload: fixed header fields and the key id.

    Canonical MessagePack of the header's `id`, `type`, `service`, `action`, `topic` and
    `correlation_id` (those present) and `kid`. `correlation_id` is included so that an
    encrypted response cannot be re-addressed to another command.

    Args:
        header_map: the header's wire map (as `unpack_header` returns it).
        kid: the key id in (or going into) `security.encryption`.
    """
    fields = {k: kid if k == "kid" else header_map[k] for k in _AAD_KEYS
              if k == "kid" or k in header_map}
    return msgpack.packb(fields, use_bin_type=True)


def _read_ring(path: Path) -> tuple[KeyRing, tuple[int, ...]]:
    # fstat of the descriptor we read from: the stamp always matches the bytes.
    try:
        with open(path, "rb") as f:
            stamp = _stamp(os.fstat(f.fileno()))
            raw = f.read()
    except OSError:
        raise _config("cannot read the key ring", path) from None
    try:
        doc = json.loads(raw)
        if doc["version"] != _FILE_VERSION:
            raise _config(f"unsupported key ring version (this mesh reads {_FILE_VERSION})", path)
        keys = {kid: base64.b64decode(e["key"], validate=True) for kid, e in doc["keys"].items()}
        retire = {kid: e["retire_at"] for kid, e in doc["keys"].items() if e["retire_at"] is not None}
        starts = {kid: e["active_from"] for kid, e in doc["keys"].items() if e.get("active_from") is not None}
        return KeyRing(keys, doc["active"], retire, starts, doc.get("generation", 0)), stamp
    except ConfigurationError as exc:
        raise _config(exc.details["reason"], path) from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):  # binascii.Error is a ValueError
        # The parser's messages may quote the file: keep them (and key bytes) out.
        raise _config("the key ring file is not valid", path) from None


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _is_time(value: object) -> bool:
    """A finite Unix time (a float, or an int a float holds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _new_kid(taken: Collection[str]) -> str:
    while True:
        kid = secrets.token_hex(4)
        if kid not in taken:
            return kid


def _config(reason: str, path: Path | None = None) -> ConfigurationError:
    details: dict[str, Any] = {"reason": reason}
    if path is not None:
        details["path"] = str(path)
    where = f" ({path})" if path is not None else ""
    return ConfigurationError(f"{reason}{where}", details=details)


def _failed(reason: str, why: str, **details: Any) -> EncryptionFailedError:
    return EncryptionFailedError(
        f"payload decryption failed: {why}", details={"reason": reason, **details}
    )
