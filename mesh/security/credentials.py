"""A client's or node's credentials: one small TOML file that names its keys and holds its token.

`mesh up` writes one per client and node into the topology's state directory when
security is on; `mesh call`, `mesh node` and the SDKs read it (`--credentials FILE`, or
the environment variable MESH_CREDENTIALS). The file holds a token, so it is written
readable by its owner only.

    broker_key = "/…/curve/broker.key"            # the broker's public certificate
    key = "/…/curve/private/dev.key_secret"      # this peer's CURVE secret certificate
    token = "eyJ…"                               # optional (clients): sent with every message
    level = 1                                    # 1 token, 2 + encrypted payloads, 3 + signatures
    keyring = "/…/keyring.json"                  # optional: payload keys (level 2 and up)
    signing_key = "/…/signing/dev.key"           # optional: ed25519 key (level 3)
    signers = "/…/signing/trusted"               # the trust store: signers' public keys
    require_signers = "/…/signing/trusted"       # optional (nodes): commands must be signed by one of these

`signers` is where received signatures are checked (every message that claims level 3).
A file written before it existed (no `signers` key) that sits in a state directory's
`credentials/` folder uses that state directory's `signing/trusted`; elsewhere it has
no trust store, and every level-3 message it receives is refused as "unknown signer".
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol import ConfigurationError, SecurityLevel
from .curve import secure_client
from .envelope import Opener, Sealer
from .files import write_file_atomic
from .payload import KeyRingFile
from .signing import SignerStore, TrustedKeys, load_signing_key

__all__ = ["Credentials", "load_credentials", "save_credentials", "ENV"]

ENV = "MESH_CREDENTIALS"
_KEYS = {"broker_key", "key", "token", "level", "keyring", "signing_key", "signers", "require_signers"}
_PATHS = ("broker_key", "key", "keyring", "signing_key", "signers", "require_signers")


@dataclass(frozen=True)
class Credentials:
    """Where a peer's keys are, and its token (never shown by repr)."""

    broker_key: Path
    key: Path
    token: str | None = None
    level: int = int(SecurityLevel.AUTHENTICATED)
    keyring: Path | None = None
    signing_key: Path | None = None
    signers: Path | None = None
    require_signers: Path | None = None

    def __repr__(self) -> str:
        return f"Credentials(key={str(self.key)!r}, level={self.level})"

    def secure(self, sock: Any) -> None:
        """Make `sock` a CURVE client of the broker (before it connects)."""
        secure_client(sock, self.key, self.broker_key)

    def sealer(self, token: Any = None) -> Sealer:
        """The sending half for this peer; `token` returns the current token (default: the file's)."""
        return Sealer(
            level=self.level,
            token=token or (lambda: self.token),
            ring=KeyRingFile(self.keyring) if self.keyring else None,
            signing_key=load_signing_key(self.signing_key) if self.signing_key else None,
        )

    def opener(self) -> Opener:
        """The receiving half for this peer."""
        return Opener(
            ring=KeyRingFile(self.keyring) if self.keyring else None,
            signers=SignerStore(self.signers) if self.signers else None,
            required_signers=TrustedKeys.load(self.require_signers) if self.require_signers else None,
        )


def load_credentials(path: str | os.PathLike[str]) -> Credentials:
    """Read a credentials file.

    Raises:
        ConfigurationError: the file is missing, not TOML, or has unknown or bad keys.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read credentials {p}: {exc.strerror}", details={"path": str(p)}) from None
    except tomllib.TOMLDecodeError:
        raise ConfigurationError(f"credentials {p} are not TOML", details={"path": str(p)}) from None
    unknown = sorted(set(data) - _KEYS)
    missing = sorted({"broker_key", "key"} - set(data))
    if unknown or missing:
        raise ConfigurationError(
            f"credentials {p}: unknown keys {unknown}, missing keys {missing}", details={"path": str(p)}
        )
    level = data.get("level", int(SecurityLevel.AUTHENTICATED))
    if isinstance(level, bool) or level not in (0, 1, 2, 3):
        raise ConfigurationError(f"credentials {p}: level must be 0 to 3", details={"path": str(p)})

    def path_of(key: str) -> Path | None:
        value = data.get(key)
        return (p.parent / value) if isinstance(value, str) else None

    token = data.get("token")
    return Credentials(
        broker_key=path_of("broker_key"),  # type: ignore[arg-type]
        key=path_of("key"),  # type: ignore[arg-type]
        token=token if isinstance(token, str) else None,
        level=level,
        keyring=path_of("keyring"),
        signing_key=path_of("signing_key"),
        signers=path_of("signers") or _state_signers(p),
        require_signers=path_of("require_signers"),
    )


def save_credentials(path: str | os.PathLike[str], creds: Credentials) -> None:
    """Write `creds` as a credentials file (owner-only: it may hold a token)."""
    lines = []
    for key in _PATHS:
        value = getattr(creds, key)
        if value is not None:
            lines.append(f"{key} = {_quote(str(Path(value).resolve()))}")
    if creds.token is not None:
        lines.append(f"token = {_quote(creds.token)}")
    lines.append(f"level = {creds.level}")
    write_file_atomic(Path(path), ("\n".join(lines) + "\n").encode())


def _state_signers(path: Path) -> Path | None:
    """The trust store of the state directory holding credentials file `path`, if any."""
    trusted = path.parent.parent / "signing" / "trusted"
    return trusted if path.parent.name == "credentials" and trusted.is_dir() else None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
