"""A broker's security, built from a state directory: what `mesh broker --state DIR` runs with.

The directory is the one `mesh up` fills (see `mesh.security.state`): the broker's CURVE pair, the
public keys it admits, the token secret, the policy and the revocations database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from ..protocol import ConfigurationError
from ..security.curve import CurveAuthenticator, secure_server
from ..security.gate import Gate, GateSettings
from ..security.policy import load_policy
from ..security.revocations import Revocations
from ..security.token_keys import load_jwks, load_public_key, load_secret
from ..security.tokens import Algorithm, TokenIssuer, TokenSettings, TokenVerifier
from .core import BrokerSecurity

__all__ = ["BrokerSecuritySetup", "broker_security", "ISSUER", "AUDIENCE"]

ISSUER = "mesh"
AUDIENCE = "mesh"


@dataclass
class BrokerSecuritySetup:
    """The three things `BrokerServer` takes when security is on."""

    security: BrokerSecurity
    secure: Callable[[zmq.Socket], None]
    zap: Callable[[zmq.Context], Any]


def broker_security(
    state: str | Path,
    *,
    min_level: int = 1,
    service_levels: Mapping[str, int] | None = None,
    max_skew: float = 10.0,
    allow_ips: Iterable[str] = (),
    deny_ips: Iterable[str] = (),
    renew_ttl: float = 3600.0,
    token_algorithm: Algorithm = "HS256",
    token_key: str | Path | None = None,
) -> BrokerSecuritySetup:
    """Load a broker's keys, token secret, policy and revocations from `state`.

    Tokens are HS256 with the state's secret, unless `token_algorithm` is EdDSA or RS256:
    then `token_key` is the issuer's public key (PEM) or a JWKS file (`.json`), and this
    broker verifies tokens but cannot renew them (it has no private key).

    Raises:
        ConfigurationError: a file is missing or invalid (the message names it).
    """
    root = Path(state)
    settings = TokenSettings(token_algorithm, ISSUER, AUDIENCE)
    issuer: TokenIssuer | None = None
    if token_algorithm == "HS256":
        key: Any = load_secret(root / "tokens" / "secret")
        issuer = TokenIssuer(settings, key)
    elif token_key is None:
        raise ConfigurationError(f"{token_algorithm} tokens need the issuer's public key or a JWKS file")
    elif str(token_key).endswith(".json"):
        key = load_jwks(token_key, token_algorithm)
    else:
        key = load_public_key(token_key)
    revocations = Revocations(root / "revocations.sqlite3")
    revocations.prune(time.time())
    gate = Gate(
        GateSettings(min_level=min_level, service_levels=dict(service_levels or {}), max_skew=max_skew),
        TokenVerifier(settings, key, revocations),
        load_policy(root / "policy.toml"),
    )
    secret_file = root / "curve" / "broker.key_secret"
    allowed = root / "curve" / "allowed"
    allow, deny = tuple(allow_ips), tuple(deny_ips)

    def zap(ctx: zmq.Context) -> CurveAuthenticator:
        auth = CurveAuthenticator(ctx, allowed, allow=allow, deny=deny)
        auth.start()
        return auth

    return BrokerSecuritySetup(
        BrokerSecurity(gate, issuer, revocations, renew_ttl),
        lambda sock: secure_server(sock, secret_file),
        zap,
    )
