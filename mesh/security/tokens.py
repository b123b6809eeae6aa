"""JWT identity: signed tokens that say who a caller is and which roles it holds.

Rules of this module:

* One algorithm per deployment (`TokenSettings.algorithm`). The verifier accepts only
  that algorithm, and checks the header's `alg` before touching a key, so `alg: none`
  and key confusion (an HS256 token "signed" with an RSA or Ed25519 public key's PEM
  bytes) are refused.
* Every claim is required: sub, roles, jti, exp, iat, nbf, iss, aud. Times are checked
  here against the `now` argument, with `leeway`, never against PyJWT's clock: the
  issuer and verifier read no clock and no file, so they are deterministic. Key files
  are `token_keys.py`'s.
* A refusal is `TokenExpiredError`, `TokenRevokedError` or `AuthenticationFailedError`
  with `details={"reason": ...}`. A token is a bearer secret: neither it nor its claims
  ever appear in an error. `jwt.*` and cryptography exceptions never leave this module.
* Verified tokens are cached until their `exp`, keyed by the token string, so the hot
  path pays a dict look-up instead of a signature check. A hit still checks the times
  against `now` and the revocation set, so revoking a cached token takes effect at once.
* Tokens carry a `kid` header: the RFC 7638 thumbprint of the verifying key, so a
  verifier given a JWKS (several keys, e.g. during a rotation) picks the right one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import uuid
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, get_args

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jwt.algorithms import HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..protocol import (
    AuthenticationFailedError,
    ConfigurationError,
    TokenExpiredError,
    TokenRevokedError,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_CACHE_SIZE",
    "MAX_TOKEN_LENGTH",
    "MIN_SECRET_BYTES",
    "Algorithm",
    "algorithm_of",
    "Identity",
    "KeySet",
    "SigningKey",
    "TokenIssuer",
    "TokenSettings",
    "TokenVerifier",
    "VerifyKey",
    "jwk",
]

Algorithm: TypeAlias = Literal["HS256", "EdDSA", "RS256"]
ALGORITHMS: Final[tuple[str, ...]] = get_args(Algorithm)

SigningKey: TypeAlias = bytes | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
VerifyKey: TypeAlias = (
    bytes
    | ed25519.Ed25519PublicKey
    | rsa.RSAPublicKey
    | ed25519.Ed25519PrivateKey
    | rsa.RSAPrivateKey
)

DEFAULT_CACHE_SIZE: Final = 10_000
# Bounds what one cache entry can cost; our tokens are well under 2 KiB even with RS256.
MAX_TOKEN_LENGTH: Final = 8192
MIN_SECRET_BYTES: Final = 32
MIN_RSA_BITS: Final = 2048
GENERATED_RSA_BITS: Final = 3072
# When the cache is full and sweeping expired entries frees less than this share,
# the oldest entries go too: the O(n) sweep then runs at most once per n/10 inserts.
_CACHE_HEADROOM: Final = 0.1

_REQUIRED_CLAIMS: Final = ("sub", "roles", "jti", "exp", "iat", "nbf", "iss", "aud")
# PyJWT checks the signature, iss, aud and presence; times and claim types are ours.
_DECODE_OPTIONS: Final = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_iss": True,
    "verify_aud": True,
    "verify_sub": False,
    "verify_jti": False,
    "require": list(_REQUIRED_CLAIMS),
}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the caller is. Never holds the token: it is a secret."""

    subject: str
    roles: frozenset[str]
    jti: str
    expires: float
    issued_at: float


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """What issuer and verifier agree on; one algorithm per deployment.

    Raises:
        ConfigurationError: an unknown algorithm, an empty issuer or audience, or a
            negative leeway.
    """

    algorithm: Algorithm
    issuer: str
    audience: str
    leeway: float = 5.0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigurationError(
                "unsupported token algorithm",
                details={"algorithm": str(self.algorithm), "allowed": list(ALGORITHMS)},
            )
        for name in ("issuer", "audience"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"token {name} must be a non-empty string")
        if not (isinstance(self.leeway, int | float) and 0 <= self.leeway < math.inf):
            raise ConfigurationError("token leeway must be a finite number >= 0")


@dataclass(frozen=True, slots=True)
class KeySet:
    """Verifying keys by `kid`, as read from a JWKS file by `load_jwks`."""

    keys: Mapping[str, VerifyKey]


@dataclass(frozen=True, slots=True)
class _Entry:
    """A verified token as the cache keeps it: enough to re-check it without crypto."""

    identity: Identity
    not_before: float


def _refused(reason: str, **details: Any) -> AuthenticationFailedError:
    """The one place a refusal is worded: a fixed phrase, never the token or claims."""
    return AuthenticationFailedError(
        f"token refused: {reason}", details={"reason": reason, **details}
    )


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def algorithm_of(key: VerifyKey) -> str:
    """The algorithm a key object belongs to, or ConfigurationError for anything else."""
    if isinstance(key, bytes):
        if len(key) < MIN_SECRET_BYTES:
            raise ConfigurationError(f"HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
        return "HS256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigurationError(f"RSA key must be at least {MIN_RSA_BITS} bits")
        return "RS256"
    raise ConfigurationError("unsupported key type", details={"type": type(key).__name__})


def _verifying_half(key: VerifyKey) -> bytes | ed25519.Ed25519PublicKey | rsa.RSAPublicKey:
    """The public key of a private key; a secret or public key unchanged."""
    if isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        return key.public_key()
    return key


def _checked_key(key: VerifyKey, settings: TokenSettings) -> None:
    algorithm = algorithm_of(key)
    if algorithm != settings.algorithm:
        raise ConfigurationError(
            "key does not match the token algorithm",
            details={"algorithm": settings.algorithm, "key_algorithm": algorithm},
        )


def jwk(key: VerifyKey) -> dict[str, Any]:
    """The JWK of a key's verifying half, with `kid`, `alg` and `use`.

    For EdDSA and RS256 that is the public key; for HS256 it is the secret itself, so a
    JWKS of HS256 keys must be kept as secret as the key (`write_jwks` writes it 0600).

    Args:
        key: an HS256 secret, or an Ed25519 / RSA private or public key.

    Returns:
        A JSON-ready dict; `kid` is the RFC 7638 thumbprint that `TokenIssuer` puts in
        its tokens' headers.

    Raises:
        ConfigurationError: the key is of an unsupported type or too weak.
    """
    algorithm = algorithm_of(key)
    public = _verifying_half(key)
    members: tuple[str, ...]
    if isinstance(public, bytes):
        fields = HMACAlgorithm.to_jwk(public, as_dict=True)
        members = ("k", "kty")
    elif isinstance(public, ed25519.Ed25519PublicKey):
        fields = OKPAlgorithm.to_jwk(public, as_dict=True)
        members = ("crv", "kty", "x")
    else:
        fields = RSAAlgorithm.to_jwk(public, as_dict=True)
        members = ("e", "kty", "n")
    # RFC 7638: the required members only, sorted, no whitespace, SHA-256.
    canonical = json.dumps({m: fields[m] for m in members}, sort_keys=True, separators=(",", ":"))
    kid = _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())
    return {**fields, "kid": kid, "alg": algorithm, "use": "sig"}


class TokenIssuer:
    """Makes signed tokens for one deployment; reads no clock.

    Args:
        settings: algorithm, issuer and audience written into every token.
        key: the HS256 secret, or the Ed25519 (EdDSA) / RSA (RS256) private key.

    Raises:
        ConfigurationError: the key does not fit `settings.algorithm`.
    """

    def __init__(self, settings: TokenSettings, key: SigningKey) -> None:
        _checked_key(key, settings)
        if isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
            raise ConfigurationError("a token issuer needs the private key, not the public key")
        self._settings = settings
        self._key = key
        self._headers = {"kid": jwk(key)["kid"]}

    def issue(self, subject: str, roles: Iterable[str], ttl_seconds: float, now: float) -> str:
        """A fresh token for `subject`, valid from `now` for `ttl_seconds`.

        Times are whole seconds (iat and nbf round down, exp rounds up) because some
        verifiers accept only integer NumericDates.

        Args:
            subject: who the token speaks for (the `sub` claim).
            roles: role names for the access policy.
            ttl_seconds: lifetime; keep it short and renew, since only revocation can
                end a token early.
            now: current time, seconds since the epoch.

        Returns:
            The compact JWS string. Treat it as a secret.

        Raises:
            ValueError: an empty subject, a role that is not a non-empty string, or a
                lifetime that is not a positive finite number.
        """
        if not isinstance(subject, str) or not subject:
            raise ValueError("subject must be a non-empty string")
        role_list = sorted(set(roles))
        if not all(isinstance(role, str) and role for role in role_list):
            raise ValueError("roles must be non-empty strings")
        if not (_is_time(ttl_seconds) and ttl_seconds > 0):
            raise ValueError("ttl_seconds must be a positive finite number")
        issued = math.floor(now)
        claims = {
            "sub": subject,
            "roles": role_list,
            "jti": uuid.uuid4().hex,
            "iat": issued,
            "nbf": issued,
            "exp": math.ceil(now + ttl_seconds),
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
        }
        return jwt.encode(
            claims, self._key, algorithm=self._settings.algorithm, headers=self._headers
        )

    def renew(self, identity: Identity, now: float, ttl: float) -> str:
        """A fresh token (new jti) for the same subject and roles: `mesh.renew`.

        Args:
            identity: the caller, as verified from its current token.
            now: current time, seconds since the epoch.
            ttl: lifetime of the new token in seconds.

        Returns:
            The new token.

        Raises:
            TokenExpiredError: `identity` has expired (beyond the leeway): an expired
                token cannot be traded for a live one.
            ValueError: as for `issue`.
        """
        if now >= identity.expires + self._settings.leeway:
            raise TokenExpiredError("token expired: cannot renew", details={"reason": "expired"})
        return self.issue(identity.subject, identity.roles, ttl, now)


class TokenVerifier:
    """Checks tokens for one deployment and caches the ones that pass; reads no clock.

    Args:
        settings: the algorithm, issuer and audience a token must have.
        key: the HS256 secret or the Ed25519 / RSA public key (a private key is reduced
            to its public half), which verifies any token whatever its `kid`; or a
            `KeySet`, from which the key is picked by the token's `kid` (a token without
            `kid` is accepted only when the set holds a single key).
        revocations: revoked jtis (e.g. `Revocations`), consulted on every verify.
        cache_size: most verified tokens kept; at least 1.

    Not thread-safe: the cache belongs to the one loop that calls `verify`.

    Raises:
        ConfigurationError: a key that does not fit `settings.algorithm`, an empty key
            set, or a cache size below 1.
    """

    def __init__(
        self,
        settings: TokenSettings,
        key: VerifyKey | KeySet,
        revocations: Container[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if isinstance(key, KeySet):
            if not key.keys:
                raise ConfigurationError("the key set holds no key")
            for member in key.keys.values():
                _checked_key(member, settings)
            self._keys: dict[str | None, Any] = {
                kid: _verifying_half(k) for kid, k in key.keys.items()
            }
            self._single = None
        else:
            _checked_key(key, settings)
            self._keys = {}
            self._single = _verifying_half(key)
        if cache_size < 1:
            raise ConfigurationError("token cache size must be at least 1")
        self._settings = settings
        self._revocations: Container[str] = revocations if revocations is not None else frozenset()
        self._cache_size = cache_size
        self._cache: dict[str, _Entry] = {}

    def __len__(self) -> int:
        """How many verified tokens are cached."""
        return len(self._cache)

    def verify(self, token: str | None, now: float) -> Identity:
        """The identity a token proves, or the reason it proves nothing.

        Args:
            token: the compact JWS from the message's `auth_token`.
            now: current time, seconds since the epoch.

        Returns:
            The caller's identity.

        Raises:
            TokenExpiredError: `exp` is past (beyond the leeway).
            TokenRevokedError: the token's jti has been revoked.
            AuthenticationFailedError: anything else; `details["reason"]` says what.
        """
        if not token:
            raise _refused("missing token")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise _refused("malformed")
        entry = self._cache.get(token)
        if entry is None:
            entry = self._verify_fully(token, now)
            self._check_live(entry, now)
            self._remember(token, entry, now)
            return entry.identity
        try:
            self._check_live(entry, now)
        except TokenExpiredError:
            del self._cache[token]
            raise
        return entry.identity

    def _check_live(self, entry: _Entry, now: float) -> None:
        """The checks a cache hit repeats: they depend on `now` and on revocations."""
        leeway = self._settings.leeway
        if now >= entry.identity.expires + leeway:
            raise TokenExpiredError("token expired", details={"reason": "expired"})
        if now < entry.not_before - leeway:
            raise _refused("not yet valid")
        if entry.identity.jti in self._revocations:
            raise TokenRevokedError("token revoked", details={"reason": "revoked"})

    def _pick_key(self, header: Mapping[str, Any]) -> Any:
        if self._single is not None:
            return self._single
        kid = header.get("kid")
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if not isinstance(kid, str) or kid not in self._keys:
            raise _refused("unknown key")
        return self._keys[kid]

    def _verify_fully(self, token: str, now: float) -> _Entry:
        """Signature, algorithm, issuer, audience and claim types: the expensive path."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("malformed") from None
        # Checked before any key is chosen: `none` and HS/RS or HS/EdDSA confusion end here.
        if header.get("alg") != self._settings.algorithm:
            raise _refused("algorithm not allowed")
        key = self._pick_key(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[self._settings.algorithm],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                options=_DECODE_OPTIONS,  # type: ignore[arg-type]
            )
        except jwt.MissingRequiredClaimError as error:
            raise _refused("missing claim", claim=error.claim) from None
        except jwt.InvalidSignatureError:
            raise _refused("bad signature") from None
        except jwt.InvalidAudienceError:
            raise _refused("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _refused("wrong issuer") from None
        except jwt.InvalidAlgorithmError:
            raise _refused("algorithm not allowed") from None
        except jwt.PyJWTError:
            raise _refused("malformed") from None
        return self._entry_from(claims, now)

    def _entry_from(self, claims: Mapping[str, Any], now: float) -> _Entry:
        subject, roles, jti = claims["sub"], claims["roles"], claims["jti"]
        if not isinstance(subject, str) or not subject:
            raise _refused("bad subject")
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise _refused("bad roles")
        if not isinstance(jti, str) or not jti:
            raise _refused("bad token id")
        exp, iat, nbf = claims["exp"], claims["iat"], claims["nbf"]
        if not (_is_time(exp) and _is_time(iat) and _is_time(nbf)):
            raise _refused("bad time claim")
        if iat > now + self._settings.leeway:
            raise _refused("issued in the future")
        identity = Identity(subject, frozenset(roles), jti, float(exp), float(iat))
        return _Entry(identity, float(max(nbf, iat)))

    def _remember(self, token: str, entry: _Entry, now: float) -> None:
        """Cache a verified token, making room first: expired entries, then the oldest."""
        if len(self._cache) >= self._cache_size:
            horizon = now - self._settings.leeway
            self._cache = {t: e for t, e in self._cache.items() if e.identity.expires > horizon}
            target = self._cache_size - max(1, int(self._cache_size * _CACHE_HEADROOM))
            while len(self._cache) > target:
                del self._cache[next(iter(self._cache))]
        self._cache[token] = entry
