"""Ed25519 message signatures (PyNaCl): who sent a message, and that nobody changed it.

Rules of this module:

* A signature covers `signing_bytes(header, payload)`: the canonical MessagePack of the
  whole header map except `security.signature` itself (so the token, the security level
  and the encryption info are covered), followed by the payload frame's bytes (the
  ciphertext when the payload is encrypted: sign after encrypting, verify before
  decrypting). A MessagePack value is self-delimiting, so the split between the two is
  unambiguous. "Canonical" means re-encoded with map keys sorted at every depth and
  floats as float64, whatever widths the sender's encoder used on the wire.
* The header has no field naming the signer, so `verify` tries the trusted keys one
  after the other (about 50 µs each); trusted sets are small (the clients and nodes of
  one mesh). A caller that knows who must have signed (the token's subject, the CURVE
  identity) passes `signer=` and pays for one check.
* `nacl.exceptions.*` never leave this module; a refused signature is a
  `SignatureInvalidError` whose `details["reason"]` is one of `REASONS`, and a bad key
  file is a `ConfigurationError` naming the path. Key bytes never appear in either.

Key files are one line of 64 hex digits (the 32 raw bytes) and a newline: the private
key (the ed25519 seed) in `NAME.key` or any path not ending in `.pub`, mode 0600; the
public key next to it in `NAME.pub`. A directory of `*.pub` files is a `TrustedKeys`
set whose names are the file stems.
"""

from __future__ import annotations

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
REASONS: Final = ("missing", "malformed", "unknown signer", "does not verify")
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
    """The bytes a signature covers: the canonical header without its signature, then the payload.

    Args:
        header_map: the header's wire map (as `unpack_header` returns it, or as the
            sender is about to encode it).
        payload_frame: the payload frame exactly as sent (ciphertext when encrypted).

    Raises:
        ValidationFailedError: the header holds a value MessagePack cannot carry (never
            for a decoded header).
    """
    header = dict(header_map)
    sec = header.get("security")
    if isinstance(sec, Mapping) and "signature" in sec:
        header["security"] = {k: v for k, v in sec.items() if k != "signature"}
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
    signer: str | None = None,
) -> str:
    """Check a message's signature against the trusted keys and say who signed it.

    Without `signer`, every trusted key is tried in turn (the header does not name
    the signer; the sets are small): a message that no key verifies is refused as
    "does not verify", since a tampered message from a known signer and a message from
    an unknown one cannot be told apart.

    Args:
        trusted: the accepted public keys.
        header_map: the received header's wire map.
        payload_frame: the received payload frame, as received.
        signer: the name that must have signed, when the caller knows it.

    Returns:
        The signer's name.

    Raises:
        SignatureInvalidError: `details["reason"]` is "missing" (no `security.signature`),
            "malformed" (not 64 bytes), "unknown signer" (`signer` is not trusted, or
            nobody is) or "does not verify".
    """
    sec = header_map.get("security")
    signature = sec.get("signature") if isinstance(sec, Mapping) else None
    if signature is None:
        raise _refused("missing", "the message is not signed")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise _refused("malformed", f"a signature is {SIGNATURE_BYTES} bytes")
    if signer is not None:
        key = trusted.get(signer)
        if key is None:
            raise _refused("unknown signer", "the signer is not trusted", signer=signer)
        candidates: list[tuple[str, VerifyKey]] = [(signer, key)]
    else:
        candidates = list(trusted._keys.items())
        if not candidates:
            raise _refused("unknown signer", "no signer is trusted")
    message = signing_bytes(header_map, payload_frame)
    for name, key in candidates:
        try:
            key.verify(message, signature)
        except CryptoError:  # BadSignatureError, or a public key that is not a curve point
            continue
        return name
    raise _refused("does not verify", "no trusted key verifies the signature")


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


def _config(reason: str, path: Path) -> ConfigurationError:
    return ConfigurationError(f"{reason} ({path})", details={"reason": reason, "path": str(path)})


def _refused(reason: str, why: str, **details: Any) -> SignatureInvalidError:
    return SignatureInvalidError(
        f"signature refused: {why}", details={"reason": reason, **details}
    )
