"""A broker's security, built from a state directory: what `mesh broker --state DIR` runs with.

The directory is the one `mesh up` fills (see `state.py`): the broker's CURVE pair, the
public keys it admits, the token secret, the policy and the revocations database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from ..broker.core import BrokerSecurity
from .curve import CurveAuthenticator, secure_server
from .gate import Gate, GateSettings
from .policy import load_policy
from .revocations import Revocations
from .tokens import TokenIssuer, TokenSettings, TokenVerifier, load_secret

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
    max_skew: float = 30.0,
    allow_ips: Iterable[str] = (),
    deny_ips: Iterable[str] = (),
    renew_ttl: float = 3600.0,
) -> BrokerSecuritySetup:
    """Load a broker's keys, token secret, policy and revocations from `state`.

    Raises:
        ConfigurationError: a file is missing or invalid (the message names it).
    """
    root = Path(state)
    settings = TokenSettings("HS256", ISSUER, AUDIENCE)
    secret = load_secret(root / "tokens" / "secret")
    revocations = Revocations(root / "revocations.sqlite3")
    revocations.prune(time.time())
    gate = Gate(
        GateSettings(min_level=min_level, service_levels=dict(service_levels or {}), max_skew=max_skew),
        TokenVerifier(settings, secret, revocations),
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
        BrokerSecurity(gate, TokenIssuer(settings, secret), revocations, renew_ttl),
        lambda sock: secure_server(sock, secret_file),
        zap,
    )
