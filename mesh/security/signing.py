"""Ed25519 message signatures (PyNaCl): who sent a message, and that nobody changed it.

Rules of this module:

* A signature covers `signing_bytes(header, payload)`: the canonical MessagePack of the
  header map without what the broker may add or a receiver cannot check in it
  (`security.signature` itself, `security.token`, and the broker's stamps `seq` and
  `sender`), followed by the payload frame's bytes (the ciphertext when the payload is
  encrypted: sign after encrypting, verify before decrypting). So an event still
  verifies after the broker stamped it. A MessagePack value is self-delimiting, so the
  split between the two is unambiguous. "Canonical" means re-encoded with map keys
  sorted at every depth and floats as float64, whatever widths the sender used. The
  token needs no signature: the broker binds it to the link it came over.
* The header has no field naming the signer: the broker says who sent a message (the
  name of the CURVE key of its link, see docs/protocol.md) and `verify` checks the
  signature with that signer's key only, one check of about 54 µs. A valid signature
  made with another key is refused like a forged one ("does not verify").
* The trust store is a directory of `NAME.pub` files (`TrustedKeys.load`);
  `SignerStore` is the same directory re-read when it changes, like the key ring file.
* `nacl.exceptions.*` never leave this module; a refused signature is a
  `SignatureInvalidError` whose `details["reason"]` is one of `REASONS`, and a bad key
  file is a `ConfigurationError` naming the path. Key bytes never appear in either.

Key files are one line of 64 hex digits (the 32 raw bytes) and a newline: the private
key (the ed25519 seed) in `NAME.key` or any path not ending in `.pub`, mode 0600; the
public key next to it in `NAME.pub`. A directory of `*.pub` files is a `TrustedKeys`
set whose names are the file stems.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import msgpack
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from mesh.protocol import (
    ConfigurationError,
    SignatureInvalidError,
    ValidationFailedError,
    canonical,
)

from .files import write_file_atomic

__all__ = [
    "PUBLIC_SUFFIX",
    "REASONS",
    "SIGNATURE_BYTES",
    "SignerStore",
    "TrustedKeys",
    "generate_signing_key",
    "load_signing_key",
    "load_verify_key",
    "public_key_path",
    "sign",
    "signing_bytes",
    "verify",
]

SIGNATURE_BYTES: Final = 64
PUBLIC_SUFFIX: Final = ".pub"
REASONS: Final = (
    "missing",  # the header claims level 3 but has no signature
    "malformed",  # not 64 bytes (a truncated signature, or not bytes at all)
    "missing sender",  # nobody says who sent it: no broker-stamped sender (security off?)
    "unknown signer",  # the sender has no public key in the trust store
    "does not verify",  # not made with the sender's key over these bytes (corrupted, forged)
    "signer not required",  # valid, but the receiver accepts only its required signers
)
# What `signing_bytes` leaves out: the broker's stamps, then those of the security map.
_UNSIGNED: Final = frozenset({"seq", "sender"})
_UNSIGNED_SECURITY: Final = frozenset({"signature", "token"})
_KEY_BYTES: Final = 32


class TrustedKeys:
    """The public keys whose signatures a process accepts, by signer name.

    Args:
        keys: signer name -> public key.
    """

    def __init__(self, keys: Mapping[str, VerifyKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TrustedKeys:
        """Every `*.pub` file of `directory`, named by its file stem.

        A bad file fails the whole load rather than being skipped: a trust set that
        silently lost a member is harder to diagnose than a refusal to start.

        Raises:
            ConfigurationError: the directory or a key file cannot be read or is invalid.
        """
        root = Path(directory)
        try:
            files = sorted(p for p in root.iterdir() if p.suffix == PUBLIC_SUFFIX and p.is_file())
        except OSError:
            raise _config("cannot read the trusted keys directory", root) from None
        return cls({p.stem: load_verify_key(p) for p in files})

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustedKeys({sorted(self._keys)!r})"

    def get(self, name: str) -> VerifyKey | None:
        """The public key of `name`, or None when it is not trusted."""
        return self._keys.get(name)


class SignerStore:
    """A trust store directory that a running client or node re-reads when it changes.

    A check lists the directory's `*.pub` files with their inodes, sizes and
    modification times, at most once per `interval`; the keys are read again only when that list
    changed (a key added, removed or replaced). A directory that has become unreadable,
    or a bad key file, keeps the last good set in use and sets `error` for the loop to
    log, as `payload.KeyRingFile` does: a typo in a new file must not make every
    signer unknown.

    Args:
        directory: the trust store (`signing/trusted` of a state directory).
        interval: the least time between two checks, in the unit of `now`.

    Raises:
        ConfigurationError: the directory or one of its keys cannot be read at start.
    """

    def __init__(self, directory: str | os.PathLike[str], *, interval: float = 1.0) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.error: ConfigurationError | None = None
        self._stamp = _listing(self.directory)
        self._keys = TrustedKeys.load(self.directory)
        self._next_check = -math.inf

    def current(self, now: float) -> TrustedKeys:
        """The keys to check signatures with now, re-read first when the directory changed.

        Args:
            now: any clock; checks happen at most once per `interval` of it.
        """
        if now >= self._next_check:
            self._next_check = now + self.interval
            try:
                stamp = _listing(self.directory)
                if stamp != self._stamp:
                    self._keys, self._stamp = TrustedKeys.load(self.directory), stamp
                self.error = None
            except ConfigurationError as exc:
                self.error = exc
        return self._keys


def public_key_path(path: str | os.PathLike[str]) -> Path:
    """Where `generate_signing_key(path)` puts the public key: `path` with suffix `.pub`."""
    return Path(path).with_suffix(PUBLIC_SUFFIX)


def generate_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Make a new key pair: the private key at `path` (0600), the public key beside it.

    Existing keys are never overwritten: replacing a signing key silently would lock
    its owner out of every peer that trusts the old public key.

    Args:
        path: the private key file, e.g. `state/keys/alice.key`; the public key goes to
            `public_key_path(path)` (`alice.pub`, signer name "alice").

    Returns:
        The new signing key.

    Raises:
        ConfigurationError: `path` ends in `.pub`, either file exists, or a file cannot
            be written.
    """
    private = Path(path)
    public = public_key_path(private)
    if private.suffix == PUBLIC_SUFFIX:
        raise _config("a private key file must not end in .pub", private)
    for p in (private, public):
        if p.exists():
            raise _config("the key file exists already", p)
    key = SigningKey.generate()
    write_file_atomic(private, _hex_line(bytes(key)), 0o600)
    write_file_atomic(public, _hex_line(bytes(key.verify_key)), 0o644)
    return key


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read a private key file written by `generate_signing_key`.

    Raises:
        ConfigurationError: the file cannot be read or is not 64 hex digits.
    """
    return SigningKey(_read_key(Path(path)))


def load_verify_key(path: str | os.PathLike[str]) -> VerifyKey:
    """Read a public key file written by `generate_signing_key`.

    Raises:
        ConfigurationError: the file cannot be read or is not 64 hex digits.
    """
    return VerifyKey(_read_key(Path(path)))


def signing_bytes(header_map: Mapping[str, Any], payload_frame: bytes) -> bytes:
    """The bytes a signature covers: the canonical header without the fields that are not
    signed (see the module rules), then the payload.

    Args:
        header_map: the header's wire map (as `unpack_header` returns it, or as the
            sender is about to encode it).
        payload_frame: the payload frame exactly as sent (ciphertext when encrypted).

    Raises:
        ValidationFailedError: the header holds a value MessagePack cannot carry (never
            for a decoded header).
    """
    header = {k: v for k, v in header_map.items() if k not in _UNSIGNED}
    sec = header.get("security")
    if isinstance(sec, Mapping):
        header["security"] = {k: v for k, v in sec.items() if k not in _UNSIGNED_SECURITY}
    try:
        packed = msgpack.packb(canonical(header), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValidationFailedError(
            f"header cannot be encoded as MessagePack ({exc})", details={"field": "header"}
        ) from None
    return packed + bytes(payload_frame)


def sign(key: SigningKey, header_map: Mapping[str, Any], payload_frame: bytes) -> bytes:
    """The 64-byte ed25519 signature to put in the header's `security.signature`.

    Args:
        key: the sender's signing key.
        header_map: the complete header map (any existing signature is ignored).
        payload_frame: the payload frame as it will be sent.

    Raises:
        ValidationFailedError: the header holds a value MessagePack cannot carry.
    """
    return key.sign(signing_bytes(header_map, payload_frame)).signature


def verify(
    trusted: TrustedKeys,
    header_map: Mapping[str, Any],
    payload_frame: bytes,
    *,
    signer: str | None,
) -> str:
    """Check that `signer` signed this message with its key in `trusted`.

    The signature's presence and shape are checked first (the message's fault), then
    the signer (the link's or the trust store's), then the one key check.

    Args:
        trusted: the trust store's keys.
        header_map: the received header's wire map.
        payload_frame: the received payload frame, as received.
        signer: who sent the message, as the broker says (None when nobody said).

    Returns:
        The signer's name.

    Raises:
        SignatureInvalidError: `details["reason"]` is "missing" (no `security.signature`),
            "malformed" (not 64 bytes), "missing sender" (`signer` is None),
            "unknown signer" (`signer` has no key in `trusted`) or "does not verify".
    """
    sec = header_map.get("security")
    signature = sec.get("signature") if isinstance(sec, Mapping) else None
    if signature is None:
        raise _refused("missing", "the message is not signed")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise _refused("malformed", f"a signature is {SIGNATURE_BYTES} bytes")
    if signer is None:
        raise _refused("missing sender", "nobody says who sent the message (is security on?)")
    key = trusted.get(signer)
    if key is None:
        raise _refused("unknown signer", "the sender has no key in the trust store", signer=signer)
    try:
        key.verify(signing_bytes(header_map, payload_frame), signature)
    except CryptoError:  # BadSignatureError, or a public key that is not a curve point
        raise _refused("does not verify", "the signature is not the sender's", signer=signer) from None
    return signer


def _hex_line(raw: bytes) -> bytes:
    return raw.hex().encode("ascii") + b"\n"


def _read_key(path: Path) -> bytes:
    try:
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise _config("cannot read the key file", path) from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != _KEY_BYTES:
        raise _config(f"a key file holds {2 * _KEY_BYTES} hex digits", path)
    return raw


def _listing(directory: Path) -> frozenset[tuple[str, int, int, int]]:
    """Name, inode, size and modification time of each `*.pub` file: what a change shows in
    (an atomic replacement is a new inode, even within one tick of the file clock)."""
    found = set()
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(PUBLIC_SUFFIX) and entry.is_file():
                    info = entry.stat()
                    found.add((entry.name, info.st_ino, info.st_size, info.st_mtime_ns))
    except OSError:
        raise _config("cannot read the trusted keys directory", directory) from None
    return frozenset(found)


def _config(reason: str, path: Path) -> ConfigurationError:
    return ConfigurationError(f"{reason} ({path})", details={"reason": reason, "path": str(path)})


def _refused(reason: str, why: str, **details: Any) -> SignatureInvalidError:
    return SignatureInvalidError(
        f"signature refused: {why}", details={"reason": reason, **details}
    )
