"""What a client or node adds to each message it sends, and checks on each it receives.

Rules of this module:

* `Sealer.seal` fills the header's `security` map for the sender's level: the token
  (level 1 and up), the payload encrypted with the key ring's active key (level 2 and
  up, the header's immutable fields authenticated with it), and an ed25519 signature
  over the header and the (encrypted) payload (level 3). It returns both frames.
  A `mesh.*` command is sealed at level 1 at most: the broker answers it itself and
  must read its payload, and it holds no payload key (docs/protocol.md, section 4).
* `Opener.open` undoes it on the receiving side: it checks the signature of every
  message that claims level 3 or more (or of every message, when the receiver
  requires signers), then decrypts when the payload is encrypted. The signature must
  verify with the trust store's key of the message's sender, the name the broker
  stamps on what it forwards; nothing in the header can claim another sender. An
  `Opener()` with nothing configured still refuses every level-3 claim (it knows no
  signer), so a receiver without security never takes a forged "signed" message.
* The broker sees tokens and levels but never the ring: it cannot read payloads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from ..protocol import EncryptionFailedError, SecurityLevel, SignatureInvalidError
from ..protocol.names import SYSTEM_SERVICE
from .payload import KeyRingFile, associated_data, decrypt, encrypt
from .signing import SignerStore, SigningKey, TrustedKeys, sign, verify

_NOBODY: TrustedKeys = TrustedKeys({})

__all__ = ["Sealer", "Opener"]


@dataclass
class Sealer:
    """The sending half: `level`, a way to get the current token, and the keys it needs.

    Args:
        level: the security level of every message sent (0 to 3).
        token: returns the token to send (renewal may change it), or None.
        ring: the key ring file (level 2 and up).
        signing_key: the sender's ed25519 key (level 3).
    """

    level: int
    token: Callable[[], str | None] = lambda: None
    ring: KeyRingFile | None = None
    signing_key: SigningKey | None = None

    def seal(self, header: dict[str, Any], payload: bytes, now: float, *, level: int | None = None) -> tuple[bytes, bytes]:
        """The header and payload frames of `header` (a wire map) and `payload`, protected.

        `level` lowers this message's level (a node answering a plain command plainly).

        Raises:
            EncryptionFailedError: encryption is asked for and there is no key ring.
        """
        level = self.level if level is None else min(level, self.level)
        if header.get("service") == SYSTEM_SERVICE:
            level = min(level, SecurityLevel.AUTHENTICATED)
        sec: dict[str, Any] = {"level": level}
        token = self.token()
        if token and level >= SecurityLevel.AUTHENTICATED:
            sec["token"] = token
        header["security"] = sec
        if level >= SecurityLevel.ENCRYPTED:
            if self.ring is None:
                raise EncryptionFailedError("no key ring to encrypt with", details={"reason": "no key ring"})
            ring = self.ring.current(now)
            payload, sec["encryption"] = encrypt(ring, payload, associated_data(header, ring.active_kid))
        if level >= SecurityLevel.SIGNED and self.signing_key is not None:
            sec["signature"] = sign(self.signing_key, header, payload)
        return msgpack.packb(header, use_bin_type=True), payload


@dataclass
class Opener:
    """The receiving half: the key ring to decrypt with, the trust store to check
    signatures with, and the signers it requires (a further restriction: by name)."""

    ring: KeyRingFile | None = None
    signers: SignerStore | None = None
    required_signers: TrustedKeys | None = None

    def open(self, header: Mapping[str, Any], payload: bytes, now: float, sender: str | None = None) -> bytes:
        """The plain payload frame of a received message.

        Args:
            header: the message's validated header map.
            payload: its payload frame, as received.
            now: the Unix time (key ring and trust store reloads).
            sender: who sent it, as the broker says (None when nobody said).

        Raises:
            SignatureInvalidError: the message claims level 3 or more, or the receiver
                requires signers, and the signature is missing or wrong (`details.reason`).
            EncryptionFailedError: the payload does not decrypt (unknown key, tampering).
        """
        sec = header.get("security") or {}
        if sec.get("level", 0) >= SecurityLevel.SIGNED or self.required_signers is not None:
            self.check_signature(header, payload, now, sender)
        info = sec.get("encryption")
        if info is None:
            return payload
        if self.ring is None:
            raise EncryptionFailedError("this receiver has no key ring", details={"reason": "no key ring"})
        kid = info.get("kid") if isinstance(info, dict) else None
        return decrypt(self.ring.current(now), payload, info, associated_data(header, kid if isinstance(kid, str) else ""))

    def check_signature(self, header: Mapping[str, Any], payload: bytes, now: float, sender: str | None) -> str:
        """Check the message's signature with its sender's key; return the signer's name.

        Raises:
            SignatureInvalidError: see `signing.verify`; or "signer not required" when the
                signer is not one of `required_signers`.
        """
        trusted = self.signers.current(now) if self.signers is not None else _NOBODY
        signer = verify(trusted, header, payload, signer=sender)
        if self.required_signers is not None and signer not in self.required_signers:
            raise SignatureInvalidError(
                "signature refused: this receiver accepts other signers only",
                details={"reason": "signer not required", "signer": signer},
            )
        return signer
