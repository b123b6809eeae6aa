"""A topology's security state directory: every key, secret and credential, made on first start.

`mesh up` calls `ensure_state` when security is on; `mesh broker --state DIR`
(`mesh.broker.secure.broker_security`) and the credentials files read what it made::

    DIR/
      curve/broker.key, broker.key_secret     the brokers' CURVE pair (one for all brokers)
      curve/broker-peer.key, .key_secret      the pair a broker's cluster peer links use as
                                              CURVE clients (one for all brokers)
      curve/allowed/NAME.key                  public certificates the broker admits
      curve/private/NAME.key, NAME.key_secret each client's and node's CURVE pair
      tokens/secret                           the HS256 token secret
      revocations.sqlite3                     revoked tokens (the broker creates it)
      policy.toml                             the access policy (generated once)
      keyring.json                            payload keys (level 2 and up)
      signing/NAME.key, NAME.pub              each client's ed25519 key
      signing/trusted/NAME.pub                the clients' public signing keys: the trust
                                              store every client and node checks signatures with
      credentials/NAME.toml                   one per client (with a token) and per node
      brokers/tcp-PORT                        the client endpoints of brokers using this directory
                                              (written by `mesh broker --state`, not here:
                                              `credentials.record_broker`)

Rules of this module:

* Create what is missing, never overwrite what exists: replacing a key locks out every
  peer that holds the old one, and the operator may have edited `policy.toml`. Running
  `ensure_state` twice changes nothing the second time, except adding the keys and
  credentials of clients and nodes that are new.
* Every file is written atomically (`files.write_file_atomic`, or the key modules that
  use it), so a crash leaves a file whole or absent; the next run completes the rest.
  A CURVE or signing pair with only one half on disk cannot be completed safely and is
  reported (`ConfigurationError` naming the file) rather than guessed at.
* Directories are created 0700; secret files 0600; public keys and the policy 0644.
  A credentials file points at secrets (and a client's holds a token): 0600.
* Nothing written here names the directory itself: credentials files name their keys
  by paths relative to themselves (`../curve/broker.key`), so the directory can be
  copied or moved anywhere and used unchanged.
* A new node does not get a `[nodes.NAME]` table in an existing policy: it is named in
  `StateLayout.policy_missing_nodes` (also when its table lacks one of its services) so
  that the caller can tell the operator what to add.
* The name `broker-peer` (`PEER_KEY_NAME`) is reserved: its public key is copied into
  `curve/allowed/`, so the ZAP handler admits the brokers' peer links, and the cluster
  transport accepts consensus messages only from links of that User-Id.
* Key material and tokens never appear in a message, a `repr` or `created`.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from ..protocol import NAME_PATTERN, ConfigurationError, SecurityLevel
from .credentials import Credentials, save_credentials
from .curve import create_keypair
from .files import write_file_atomic
from .payload import KeyRing
from .policy import load_policy, parse_policy
from .signing import generate_signing_key
from .token_keys import generate_secret, load_secret
from .tokens import TokenIssuer, TokenSettings

__all__ = [
    "ADMIN_CLIENT",
    "AUDIENCE",
    "DEFAULT_TOKEN_TTL",
    "ISSUER",
    "PEER_KEY_NAME",
    "READER_ALLOW",
    "BRIDGE_CLIENT",
    "BRIDGE_ALLOW",
    "StateLayout",
    "ensure_state",
    "issue_token",
    "policy_text",
    "token_settings",
]

ISSUER: Final = "mesh"
PEER_KEY_NAME: Final = "broker-peer"  # the CURVE identity of the brokers' cluster links
AUDIENCE: Final = "mesh"
DEFAULT_TOKEN_TTL: Final = 30 * 86400
TOKEN_LEEWAY: Final = 5.0
# The client made by default; its token holds the admin role. Other clients named only
# by name get the reader role (a secure default for a dashboard or a read-only tool),
# except the MCP bridge's, below.
ADMIN_CLIENT: Final = "dev"
_DEFAULT_ROLE: Final = "reader"
READER_ALLOW: Final = (
    "mesh.ping", "mesh.services", "mesh.replay",
    "*.get", "*.list", "*.query", "*.read", "*.search", "echo.*",
)  # fmt: skip
# The MCP bridge (`mesh mcp`): a client named "bridge" gets the role "bridge", which
# may list and follow the registry and call what an AI assistant may safely use
# (reads, the kv store, echo; never kv.delete or mesh.revoke).
BRIDGE_CLIENT: Final = "bridge"
BRIDGE_ALLOW: Final = (
    "mesh.ping", "mesh.services",
    "*.get", "*.list", "*.query", "*.read", "*.search", "*.tables", "echo.*", "kv.put",
)  # fmt: skip
_NAME: Final = re.compile(NAME_PATTERN)
_DIR_MODE: Final = 0o700
_PUBLIC_MODE: Final = 0o644


def token_settings(issuer: str = ISSUER, audience: str = AUDIENCE) -> TokenSettings:
    """The token settings of a state directory: HS256 with its secret, leeway 5 s.

    Raises:
        ConfigurationError: an empty issuer or audience.
    """
    return TokenSettings("HS256", issuer, audience, TOKEN_LEEWAY)


@dataclass(frozen=True)
class StateLayout:
    """Where everything of a state directory is, and what the last `ensure_state` made.

    `StateLayout.at(directory)` gives the paths without touching the disk.
    """

    root: Path
    broker_secret: Path
    broker_public: Path
    peer_secret: Path
    peer_public: Path
    allowed_dir: Path
    private_dir: Path
    token_secret: Path
    revocations: Path
    policy: Path
    keyring: Path
    signing_dir: Path
    trusted_signers: Path
    credentials_dir: Path
    created: list[str] = field(default_factory=list)
    """Paths (relative to `root`, with `/`) of the files made by this call, in order."""
    policy_missing_nodes: list[str] = field(default_factory=list)
    """Nodes the existing policy does not let register all their services, sorted."""

    @classmethod
    def at(cls, directory: str | os.PathLike[str]) -> StateLayout:
        """The layout of `directory` (nothing is read or created)."""
        root = Path(directory)
        curve, signing = root / "curve", root / "signing"
        return cls(
            root=root,
            broker_secret=curve / "broker.key_secret",
            broker_public=curve / "broker.key",
            peer_secret=curve / f"{PEER_KEY_NAME}.key_secret",
            peer_public=curve / f"{PEER_KEY_NAME}.key",
            allowed_dir=curve / "allowed",
            private_dir=curve / "private",
            token_secret=root / "tokens" / "secret",
            revocations=root / "revocations.sqlite3",
            policy=root / "policy.toml",
            keyring=root / "keyring.json",
            signing_dir=signing,
            trusted_signers=signing / "trusted",
            credentials_dir=root / "credentials",
        )

    def credentials(self, name: str) -> Path:
        """The credentials file of client or node `name`."""
        return self.credentials_dir / f"{name}.toml"

    def curve_secret(self, name: str) -> Path:
        """The CURVE secret certificate of client or node `name`."""
        return self.private_dir / f"{name}.key_secret"

    def signing_key(self, name: str) -> Path:
        """The ed25519 private key of client `name`."""
        return self.signing_dir / f"{name}.key"


def ensure_state(
    directory: str | os.PathLike[str],
    *,
    nodes: Mapping[str, Iterable[str]],
    clients: Iterable[str] | Mapping[str, Iterable[str]] = (ADMIN_CLIENT,),
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    token_ttl: float = DEFAULT_TOKEN_TTL,
    now: float,
) -> StateLayout:
    """Create whatever is missing in a state directory; never overwrite a file.

    Args:
        directory: the state directory; created (0700) when missing.
        nodes: node name -> the service names it offers (its CURVE identity and its
            `[nodes.NAME]` table in a generated policy).
        clients: client names, or client name -> token roles. A client named only by
            name gets the role "admin" if it is "dev", "bridge" if it is
            "bridge", "reader" otherwise.
        issuer: the `iss` of the clients' tokens.
        audience: the `aud` of the clients' tokens.
        token_ttl: lifetime of a new client token, in seconds.
        now: the current Unix time (the tokens' `iat`).

    Returns:
        The layout, with the files made by this call and the nodes the policy lacks.

    Raises:
        ConfigurationError: a bad name, a name used by a client and a node, a key pair
            with one half missing, an existing policy with problems (`PolicyError`), or
            a file that cannot be written.
    """
    node_services = {name: tuple(dict.fromkeys(services)) for name, services in nodes.items()}
    client_roles = _client_roles(clients)
    _check_names(node_services, client_roles)
    layout = StateLayout.at(directory)
    made: list[str] = []

    def note(path: Path) -> None:
        made.append(path.relative_to(layout.root).as_posix())

    missing = _ensure_shared(layout, node_services, note)

    for name in [*client_roles, *node_services]:
        public, secret = layout.private_dir / f"{name}.key", layout.curve_secret(name)
        if _missing_pair(public, secret):
            create_keypair(layout.private_dir, name)
            note(public)
            note(secret)
        if _copy_if_missing(public, layout.allowed_dir / f"{name}.key"):
            note(layout.allowed_dir / f"{name}.key")

    _ensure_clients(layout, client_roles, note, issuer=issuer, audience=audience, token_ttl=token_ttl, now=now)

    for name in node_services:
        path = layout.credentials(name)
        if not path.exists():
            save_credentials(path, _credentials(layout, name, token=None, signing=False), root=layout.root)
            note(path)

    return replace(layout, created=made, policy_missing_nodes=missing)


def _ensure_shared(
    layout: StateLayout, node_services: Mapping[str, tuple[str, ...]], note: Callable[[Path], None]
) -> list[str]:
    """Make the directories and the files every broker shares (`ensure_state`'s first part).

    Returns:
        The nodes an existing policy lacks (none when the policy is made here).
    """
    for folder in (
        layout.root, layout.root / "curve", layout.allowed_dir, layout.private_dir,
        layout.token_secret.parent, layout.signing_dir, layout.trusted_signers, layout.credentials_dir,
    ):  # fmt: skip
        _make_dir(folder)

    if _missing_pair(layout.broker_public, layout.broker_secret):
        create_keypair(layout.root / "curve", "broker")
        note(layout.broker_public)
        note(layout.broker_secret)
    if _missing_pair(layout.peer_public, layout.peer_secret):
        create_keypair(layout.root / "curve", PEER_KEY_NAME)
        note(layout.peer_public)
        note(layout.peer_secret)
    if _copy_if_missing(layout.peer_public, layout.allowed_dir / f"{PEER_KEY_NAME}.key"):
        note(layout.allowed_dir / f"{PEER_KEY_NAME}.key")
    if not layout.token_secret.exists():
        generate_secret(layout.token_secret)
        note(layout.token_secret)
    if not layout.keyring.exists():
        KeyRing.generate().save(layout.keyring)
        note(layout.keyring)
    if layout.policy.exists():
        missing = _policy_missing(layout.policy, node_services)
    else:
        _write_policy(layout.policy, node_services)
        note(layout.policy)
        missing = []
    return missing


def _ensure_clients(
    layout: StateLayout,
    client_roles: Mapping[str, tuple[str, ...]],
    note: Callable[[Path], None],
    *,
    issuer: str,
    audience: str,
    token_ttl: float,
    now: float,
) -> None:
    """Make each client's signing key, its trust-store copy and its credentials with a token."""
    secret_bytes: bytes | None = None
    for name, roles in client_roles.items():
        private, public = layout.signing_key(name), layout.signing_dir / f"{name}.pub"
        if _missing_pair(public, private):
            generate_signing_key(private)
            note(private)
            note(public)
        if _copy_if_missing(public, layout.trusted_signers / f"{name}.pub"):
            note(layout.trusted_signers / f"{name}.pub")
        path = layout.credentials(name)
        if not path.exists():
            if secret_bytes is None:
                secret_bytes = load_secret(layout.token_secret)
            issuer_ = TokenIssuer(token_settings(issuer, audience), secret_bytes)
            token = issuer_.issue(name, roles, token_ttl, now)
            save_credentials(path, _credentials(layout, name, token=token, signing=True), root=layout.root)
            note(path)


def issue_token(
    directory: str | os.PathLike[str],
    subject: str,
    roles: Iterable[str],
    ttl: float,
    now: float,
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
) -> str:
    """A new token signed with the state directory's secret (`mesh token issue`).

    Args:
        directory: a state directory made by `ensure_state`.
        subject: who the token speaks for.
        roles: its role names in the policy.
        ttl: lifetime in seconds.
        now: the current Unix time.
        issuer: the `iss` claim; the broker expects the one of the state's tokens.
        audience: the `aud` claim; likewise.

    Returns:
        The token. Treat it as a secret.

    Raises:
        ConfigurationError: the secret file is missing or invalid.
        ValueError: an empty subject or role, or a lifetime that is not positive.
    """
    secret = load_secret(StateLayout.at(directory).token_secret)
    return TokenIssuer(token_settings(issuer, audience), secret).issue(subject, roles, ttl, now)


def _client_roles(clients: Iterable[str] | Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    if isinstance(clients, str):
        raise ConfigurationError("clients must be a collection of names, not one string")
    if isinstance(clients, Mapping):
        return {name: tuple(roles) for name, roles in clients.items()}
    named = {ADMIN_CLIENT: "admin", BRIDGE_CLIENT: "bridge"}
    return {name: (named.get(name, _DEFAULT_ROLE),) for name in clients}


def _check_names(nodes: Mapping[str, tuple[str, ...]], clients: Mapping[str, tuple[str, ...]]) -> None:
    for kind, names in (("node", nodes), ("client", clients)):
        for name in names:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ConfigurationError(
                    f"{kind} name {name!r} must match {NAME_PATTERN}", details={"name": str(name)}
                )
    reserved = sorted({PEER_KEY_NAME} & (set(nodes) | set(clients)))
    if reserved:
        raise ConfigurationError(
            f"{PEER_KEY_NAME} is the name of the brokers' cluster key; name the client or node otherwise",
            details={"names": reserved},
        )
    both = sorted(set(nodes) & set(clients))
    if both:
        raise ConfigurationError(
            f"{', '.join(both)}: a name cannot be both a client and a node (they would share keys)",
            details={"names": both},
        )


def _make_dir(path: Path) -> None:
    if path.is_dir():
        return
    try:
        path.mkdir(mode=_DIR_MODE, parents=True)
        path.chmod(_DIR_MODE)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create {path}: {exc.strerror}", details={"path": str(path)}
        ) from None


def _missing_pair(public: Path, private: Path) -> bool:
    """Whether a key pair must be made; a pair with one half on disk is an error."""
    have_public, have_private = public.exists(), private.exists()
    if have_public != have_private:
        present, absent = (public, private) if have_public else (private, public)
        raise ConfigurationError(
            f"{present} exists without {absent}; remove {present.name} to make a new pair",
            details={"path": str(present)},
        )
    return not have_public


def _copy_if_missing(source: Path, target: Path) -> bool:
    """Copy a public key file unless `target` exists; whether it was copied."""
    if target.exists():
        return False
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {source}: {exc.strerror}", details={"path": str(source)}
        ) from None
    write_file_atomic(target, data, _PUBLIC_MODE)
    return True


def _credentials(layout: StateLayout, name: str, *, token: str | None, signing: bool) -> Credentials:
    return Credentials(
        broker_key=layout.broker_public,
        key=layout.curve_secret(name),
        token=token,
        level=int(SecurityLevel.AUTHENTICATED),
        keyring=layout.keyring,
        signing_key=layout.signing_key(name) if signing else None,
        signers=layout.trusted_signers,
    )


def _policy_missing(path: Path, nodes: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The nodes that the policy at `path` does not let register every one of their services."""
    policy = load_policy(path)
    return sorted(
        name
        for name, services in nodes.items()
        if name not in policy.nodes or not all(policy.may_register(name, s).allowed for s in services)
    )


def _toml_list(items: Iterable[str]) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def policy_text(nodes: Mapping[str, Iterable[str]]) -> str:
    """The policy `ensure_state` writes for a topology whose nodes offer these services."""
    lines = [
        "# The access policy of this mesh, generated on first start. The brokers read it at",
        "# start; mesh never rewrites it, so edit it freely (then restart the brokers). In a",
        "# broker cluster the policy lives in the replicated log: `mesh policy set FILE`.",
        "#",
        "# Deny by default: a command needs a role of the caller's token that allows it, and",
        "# any role that denies it wins. Command patterns are service.action with * and ?,",
        "# or * alone; topic patterns are a topic (and all below it), topic.* or *.",
        "# Keys of a role: allow, deny, cidrs (the role applies only from these networks),",
        "# renew (may trade its token for a fresh one: mesh.renew), publish, subscribe.",
        "",
        "# Everything: every command (mesh.revoke too), token renewal, every topic.",
        "[roles.admin]",
        'allow = ["*"]',
        "renew = true",
        'publish = ["*"]',
        'subscribe = ["*"]',
        "",
        "# Read-only commands (by action name) and the echo service; may watch every topic.",
        "[roles.reader]",
        f"allow = {_toml_list(READER_ALLOW)}",
        'subscribe = ["*"]',
        "",
        "# The MCP bridge (mesh mcp, docs/mcp.md): its tools are exactly what this allows;",
        "# it follows the registry's mesh.service events to keep its tool list current.",
        "[roles.bridge]",
        f"allow = {_toml_list(BRIDGE_ALLOW)}",
        'deny = ["*.delete"]',
        'subscribe = ["mesh.service"]',
        "",
        "# The services each node (by the name of its CURVE key) may register, and the event",
        "# topics it may publish (its services' own topics). A node that is not listed here",
        "# may do neither.",
    ]
    for name, services in nodes.items():
        lines += ["", f"[nodes.{name}]", f"services = {_toml_list(dict.fromkeys(services))}",
                  f"publish = {_toml_list(dict.fromkeys(s for s in services if not set(s) & set('*?')))}"]
    if not nodes:
        lines += ["#", "# [nodes.echo]", '# services = ["echo"]', '# publish = ["echo"]']
    return "\n".join(lines) + "\n"


def _write_policy(path: Path, nodes: Mapping[str, tuple[str, ...]]) -> None:
    text = policy_text(nodes)
    # Checked before writing: a generated policy the broker cannot load helps nobody.
    parse_policy(tomllib.loads(text), str(path))
    write_file_atomic(path, text.encode("utf-8"), _PUBLIC_MODE)
