"""A client's or node's credentials: one small TOML file that names its keys and holds its token.

`mesh up` writes one per client and node into the topology's state directory when
security is on; `mesh call`, `mesh node` and the SDKs read it (`--credentials FILE`, or
the environment variable MESH_CREDENTIALS). The file holds a token, so it is written
readable by its owner only.

    broker_key = "../curve/broker.key"           # the broker's public certificate
    key = "../curve/private/dev.key_secret"      # this peer's CURVE secret certificate
    token = "eyJ…"                               # optional (clients): sent with every message
    level = 1                                    # 1 token, 2 + encrypted payloads, 3 + signatures
    keyring = "../keyring.json"                  # optional: payload keys (level 2 and up)
    signing_key = "../signing/dev.key"           # optional: ed25519 key (level 3)
    signers = "../signing/trusted"               # the trust store: signers' public keys
    require_signers = "/…/signing/trusted"       # optional (nodes): commands must be signed by one of these

Rules of this module:

* A relative path is relative to the directory holding the credentials file, never to
  the working directory, so a state directory copied or moved anywhere (another path,
  another user's home) works unchanged. `ensure_state` writes the paths of the state
  directory's own files that way (`save_credentials(..., root=)`).
* An absolute path is used as it is. A file written before paths were relative holds
  absolute ones; when it sits in a state directory's `credentials/` folder and such a
  path no longer exists (the directory was moved), the same file is looked for under
  the state directory it sits in now (`_moved`), so old state directories move too.
* `signers` is where received signatures are checked (every message that claims level
  3). A file written before it existed (no `signers` key) that sits in a state
  directory's `credentials/` folder uses that state directory's `signing/trusted`;
  elsewhere it has no trust store, and every level-3 message it receives is refused as
  "unknown signer".
* Which file a command uses when none is named is decided in one place, `find_credentials`:
  the path given, then MESH_CREDENTIALS, then the default state directory's file for
  that client (`var/mesh/credentials/NAME.toml`, relative to the working directory)
  when that state directory records the broker addressed (`var/mesh/brokers/tcp-PORT`,
  written by every `mesh broker --state` at start), at any port.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from ..protocol import ConfigurationError, SecurityLevel
from .curve import secure_client
from .envelope import Opener, Sealer
from .files import write_file_atomic
from .payload import KeyRingFile
from .signing import SignerStore, TrustedKeys, load_signing_key

__all__ = [
    "DEFAULT_STATE", "ENV", "Credentials", "Found", "broker_record", "find_credentials", "load_credentials",
    "record_broker", "save_credentials",
]  # fmt: skip

ENV: Final = "MESH_CREDENTIALS"
DEFAULT_STATE: Final = "var/mesh"  # the state directory of `mesh up` and the quickstart
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
        if not isinstance(value, str):
            return None
        # Resolved now, so that the credentials stay right if the process changes directory.
        return _moved(Path(value), p) if Path(value).is_absolute() else (p.parent / value).resolve()

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


def save_credentials(path: str | os.PathLike[str], creds: Credentials, *, root: str | os.PathLike[str] | None = None) -> None:
    """Write `creds` as a credentials file (owner-only: it may hold a token).

    Args:
        path: the file to write; its directory must exist.
        creds: what to write.
        root: a directory that travels with the file (its state directory): paths
            inside it are written relative to the file's directory, so that moving
            `root` as a whole keeps the file valid. Other paths, and all paths when
            `root` is None, are written absolute.

    Raises:
        ConfigurationError: the file cannot be written.
    """
    folder = Path(path).resolve().parent
    home = Path(root).resolve() if root is not None else None
    lines = []
    for key in _PATHS:
        value = getattr(creds, key)
        if value is not None:
            target = Path(value).resolve()
            if home is not None and target.is_relative_to(home):
                lines.append(f"{key} = {_quote(Path(os.path.relpath(target, folder)).as_posix())}")
            else:
                lines.append(f"{key} = {_quote(str(target))}")
    if creds.token is not None:
        lines.append(f"token = {_quote(creds.token)}")
    lines.append(f"level = {creds.level}")
    write_file_atomic(Path(path), ("\n".join(lines) + "\n").encode())


@dataclass(frozen=True)
class Found:
    """The credentials file a command uses, and how it was chosen (for messages)."""

    path: Path | None
    """The file; None when none was given and the state directory has none for the broker."""
    source: str
    """One of: given (an argument, `--credentials`), env (MESH_CREDENTIALS), state (the
    state directory's file), none."""
    unused: Path | None = None
    """With source none: the state directory's file, left unused because the state
    directory records no broker at the address."""


def find_credentials(
    given: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] = ("dev",),
    brokers: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    state: str | os.PathLike[str] = DEFAULT_STATE,
) -> Found:
    """Choose the credentials file: `given`, then MESH_CREDENTIALS, then the state directory's.

    The state directory's file is used for a broker that the state directory records
    (`record_broker`: every `mesh broker --state DIR` records its client endpoint), at
    any port, so that a client of a broker with security off is not handed keys it
    cannot use. A wrong choice fails the CURVE handshake, and the CLI's message names
    the file tried and how to pick another.

    Args:
        given: a file named by the caller (`--credentials`); used even if missing, so
            that loading it reports the problem.
        names: the clients whose files to look for in the state directory, the first
            that exists wins (`("bridge", "dev")` for the MCP bridge).
        brokers: the client endpoints addressed; the state directory's file is used
            if it records one of them (None: whatever the broker).
        environ: the environment to read MESH_CREDENTIALS from (default `os.environ`);
            an empty value counts as unset.
        state: the state directory to look in last.

    Returns:
        The file and how it was found; `Found(None, "none")` when there is none.
    """
    if given is not None:
        return Found(Path(given), "given")
    env = (os.environ if environ is None else environ).get(ENV)
    if env:
        return Found(Path(env), "env")
    for name in names:
        default = Path(state) / "credentials" / f"{name}.toml"
        if default.is_file():
            if brokers is None or any(broker_record(state, ep).is_file() for ep in brokers):
                return Found(default, "state")
            return Found(None, "none", unused=default)
    return Found(None, "none")


def broker_record(state: str | os.PathLike[str], endpoint: str) -> Path:
    """Where state directory `state` records a broker serving clients at `endpoint`.

    A TCP endpoint is recorded by its port only (`brokers/tcp-6555`): a broker bound to
    `tcp://*:6555` is dialled as `tcp://127.0.0.1:6555`, `tcp://localhost:6555` or by
    its host's name. Any other endpoint is recorded whole, by a hash of it
    (`ipc-1f0c…`: an ipc:// path would not fit in a file name), the file holding it.
    """
    transport, _, address = endpoint.partition("://")
    port = address.rpartition(":")[2]
    if transport == "tcp" and port.isdigit():
        name = f"tcp-{port}"
    else:
        name = f"{quote(transport, safe='')[:16]}-{hashlib.sha256(endpoint.encode()).hexdigest()[:32]}"
    return Path(state) / "brokers" / name


def record_broker(state: str | os.PathLike[str], endpoint: str) -> None:
    """Record in `state` that a broker using it serves clients at `endpoint` (as bound).

    `find_credentials` then gives the state directory's credentials to a client of that
    address. Records are never removed: a stale one only makes a client of some other
    broker at that port try these credentials, and its refusal names the file.

    Raises:
        ConfigurationError: the record cannot be written.
    """
    path = broker_record(state, endpoint)
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create {path.parent}: {exc.strerror}", details={"path": str(path.parent)}) from None
    write_file_atomic(path, (endpoint + "\n").encode(), 0o644)


def _moved(path: Path, file: Path) -> Path:
    """Absolute `path` as named in credentials `file`, or, when it no longer exists and
    `file` sits in a state directory (which was moved), the same file under its new place.

    The longest tail of `path` that exists under the state directory holding `file`
    wins: `/old/var/mesh/curve/broker.key` becomes `NEW/curve/broker.key`.
    """
    if file.parent.name != "credentials" or path.exists():
        return path
    root = file.parent.parent
    for start in range(1, len(path.parts)):
        candidate = root.joinpath(*path.parts[start:])
        if candidate.exists():
            return candidate
    return path


def _state_signers(path: Path) -> Path | None:
    """The trust store of the state directory holding credentials file `path`, if any."""
    trusted = path.parent.parent / "signing" / "trusted"
    return trusted if path.parent.name == "credentials" and trusted.is_dir() else None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
