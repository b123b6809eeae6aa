"""JWT identity: issue, verify, refuse, revoke and cache tokens, with real keys for HS256, EdDSA and RS256."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from joserfc import jwt as jose_jwt
from joserfc.jwk import OctKey, OKPKey, RSAKey

from mesh.protocol import (
    AuthenticationFailedError,
    ConfigurationError,
    MeshError,
    TokenExpiredError,
    TokenRevokedError,
)
from mesh.security import tokens
from mesh.security.revocations import DEFAULT_GRACE_S, Revocations
from mesh.security.token_keys import (
    generate_private_key,
    generate_secret,
    load_jwks,
    load_private_key,
    load_public_key,
    load_secret,
    public_key_path,
    write_jwks,
)
from mesh.security.tokens import (
    Identity,
    KeySet,
    TokenIssuer,
    TokenSettings,
    TokenVerifier,
    jwk,
)

NOW = 1_700_000_000.0
TTL = 600
ISSUER = "mesh-test"
AUDIENCE = "mesh"
LEEWAY = 5.0
ALGORITHMS = ("HS256", "EdDSA", "RS256")
REQUIRED = ("sub", "roles", "jti", "exp", "iat", "nbf", "iss", "aud")


@dataclass(frozen=True)
class Keys:
    """One algorithm's key material, made by the module's own generators and loaders."""

    algorithm: str
    signing: Any  # secret bytes or private key
    verifying: Any  # secret bytes or public key
    other: Any  # an unrelated signing key of the same kind
    pem_path: Path | None  # the private key file (None for HS256)

    @property
    def settings(self) -> TokenSettings:
        return TokenSettings(self.algorithm, ISSUER, AUDIENCE, LEEWAY)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def all_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Keys]:
    """Keys for every algorithm, generated once per module (RSA 3072 is slow)."""
    directory = tmp_path_factory.mktemp("keys")
    generate_secret(directory / "hs.secret")
    secret = load_secret(directory / "hs.secret")
    made = {"HS256": Keys("HS256", secret, secret, os.urandom(32), None)}
    for algorithm, other in (
        ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ):
        path = directory / f"{algorithm}.pem"
        generate_private_key(path, algorithm)  # type: ignore[arg-type]
        made[algorithm] = Keys(
            algorithm, load_private_key(path), load_public_key(public_key_path(path)), other, path
        )
    return made


@pytest.fixture(params=ALGORITHMS)
def keys(request: pytest.FixtureRequest, all_keys: dict[str, Keys]) -> Keys:
    return all_keys[request.param]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims at NOW; a change to `None` removes the claim."""
    base = {
        "sub": "tool-1",
        "roles": ["reader", "writer"],
        "jti": "0123456789abcdef",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + TTL,
        "iss": ISSUER,
        "aud": AUDIENCE,
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def signed(keys: Keys, payload: dict[str, Any]) -> str:
    """A token with arbitrary claims, correctly signed with the deployment's key."""
    return jwt.encode(payload, keys.signing, algorithm=keys.algorithm)


def refusal(
    verifier: TokenVerifier,
    token: Any,
    now: float = NOW,
    *,
    kind: type[MeshError] = AuthenticationFailedError,
) -> MeshError:
    """Verify expecting `kind`; also check the error leaks neither the token nor its claims."""
    with pytest.raises(kind) as caught:
        verifier.verify(token, now)
    error = caught.value
    assert type(error) is kind
    text = f"{error} {error.message} {error.details!r} {error!r}"
    if isinstance(token, str) and token:
        assert token not in text
        for part in token.split("."):
            if len(part) > 8:
                assert part not in text
    assert "tool-1" not in text and "0123456789abcdef" not in text
    return error


def reason(verifier: TokenVerifier, token: Any, now: float = NOW) -> str:
    return refusal(verifier, token, now).details["reason"]


def flip(text: str, index: int) -> str:
    """Change one base64url character (to one that decodes to different bits)."""
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


class DecodeCounter:
    """Counts real `jwt.decode` calls (signature checks) made by the tokens module."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(tokens.jwt, "decode", counting)


# Round trip, times


def test_issue_and_verify_round_trip(keys: Keys) -> None:
    """A token issued by TokenIssuer verifies to the subject, roles, jti and times it was issued with."""
    token = TokenIssuer(keys.settings, keys.signing).issue(
        "tool-1", ["writer", "reader"], TTL, NOW + 0.5
    )
    identity = TokenVerifier(keys.settings, keys.verifying).verify(token, NOW + 1)
    assert identity.subject == "tool-1"
    assert identity.roles == frozenset({"reader", "writer"})
    assert identity.expires == NOW + TTL + 1  # exp rounds up
    assert identity.issued_at == NOW  # iat rounds down
    assert len(identity.jti) == 32
    assert token not in repr(identity)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == keys.algorithm and header["kid"] == jwk(keys.signing)["kid"]


def test_every_token_has_its_own_jti(keys: Keys) -> None:
    """Two tokens for the same subject differ in jti, so one can be revoked alone."""
    issuer = TokenIssuer(keys.settings, keys.signing)
    verifier = TokenVerifier(keys.settings, keys.verifying)
    first = verifier.verify(issuer.issue("tool-1", [], TTL, NOW), NOW)
    second = verifier.verify(issuer.issue("tool-1", [], TTL, NOW), NOW)
    assert first.jti != second.jti


def test_expired_token_is_refused_after_the_leeway(keys: Keys) -> None:
    """exp in the past is TokenExpiredError once the leeway is spent; within it the token passes."""
    token = signed(keys, claims())
    exp = NOW + TTL
    assert TokenVerifier(keys.settings, keys.verifying).verify(token, exp + LEEWAY - 0.1).jti
    error = refusal(
        TokenVerifier(keys.settings, keys.verifying), token, exp + LEEWAY, kind=TokenExpiredError
    )
    assert error.details == {"reason": "expired"}


def test_token_before_nbf_is_not_yet_valid(keys: Keys) -> None:
    """nbf in the future (beyond the leeway) is refused as not yet valid."""
    token = signed(keys, claims(nbf=int(NOW) + 100))
    verifier = TokenVerifier(keys.settings, keys.verifying)
    assert reason(verifier, token, NOW + 100 - LEEWAY - 1) == "not yet valid"
    assert verifier.verify(token, NOW + 100 - LEEWAY).subject == "tool-1"


def test_token_issued_in_the_future_is_refused(keys: Keys) -> None:
    """iat ahead of now (beyond the leeway) means a skewed or forged issuer clock."""
    token = signed(keys, claims(iat=int(NOW) + 60, nbf=int(NOW) - 60))
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "issued in the future"


# Tampering, wrong parties, algorithms


def test_tampered_payload_is_refused(keys: Keys) -> None:
    """Changing one character of the payload breaks the signature."""
    header, payload, signature = signed(keys, claims()).split(".")
    token = ".".join((header, flip(payload, len(payload) // 2), signature))
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "bad signature"


def test_tampered_signature_is_refused(keys: Keys) -> None:
    """Changing one character of the signature is refused."""
    header, payload, signature = signed(keys, claims()).split(".")
    token = ".".join((header, payload, flip(signature, len(signature) // 2)))
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "bad signature"


def test_token_signed_with_another_key_is_refused(keys: Keys) -> None:
    """A well-formed token from a key the verifier does not hold has a bad signature."""
    token = jwt.encode(claims(), keys.other, algorithm=keys.algorithm)
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "bad signature"


def test_wrong_audience_is_refused(keys: Keys) -> None:
    """A token for another audience is refused."""
    token = signed(keys, claims(aud="other-mesh"))
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "wrong audience"


def test_wrong_issuer_is_refused(keys: Keys) -> None:
    """A token from another issuer is refused, even with the right key."""
    settings = TokenSettings(keys.algorithm, "someone-else", AUDIENCE)  # type: ignore[arg-type]
    token = TokenIssuer(settings, keys.signing).issue("tool-1", [], TTL, NOW)
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "wrong issuer"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(keys: Keys, alg: str) -> None:
    """An unsigned token (alg none, empty signature) is refused whatever the spelling."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    token = f"{header}.{b64url(json.dumps(claims()).encode())}."
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "algorithm not allowed"


def hs256_forgery(secret: bytes) -> str:
    """An HS256 token whose HMAC key is `secret`, built by hand (PyJWT refuses PEM secrets)."""
    signing_input = ".".join(
        (
            b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()),
            b64url(json.dumps(claims()).encode()),
        )
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
def test_hs256_signed_with_the_public_key_pem_is_refused(
    all_keys: dict[str, Keys], algorithm: str
) -> None:
    """Algorithm confusion: an HS256 token keyed with the public PEM never reaches the key."""
    keys = all_keys[algorithm]
    assert keys.pem_path is not None
    for pem in (
        public_key_path(keys.pem_path).read_bytes(),
        public_key_path(keys.pem_path).read_bytes().strip(),
    ):
        token = hs256_forgery(pem)
        assert (
            reason(TokenVerifier(keys.settings, keys.verifying), token) == "algorithm not allowed"
        )


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
def test_asymmetric_token_is_refused_by_an_hs256_verifier(
    all_keys: dict[str, Keys], algorithm: str
) -> None:
    """The reverse confusion: a validly signed EdDSA/RS256 token means nothing to an HS256 deployment."""
    hs = all_keys["HS256"]
    token = signed(all_keys[algorithm], claims())
    assert reason(TokenVerifier(hs.settings, hs.verifying), token) == "algorithm not allowed"


# Claims


@pytest.mark.parametrize("claim", REQUIRED)
def test_missing_claim_is_refused(keys: Keys, claim: str) -> None:
    """Every claim is required; the refusal names the claim, not its value."""
    token = signed(keys, claims(**{claim: None}))
    error = refusal(TokenVerifier(keys.settings, keys.verifying), token)
    assert error.details == {"reason": "missing claim", "claim": claim}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"roles": "admin"}, "bad roles"),
        ({"roles": {"admin": True}}, "bad roles"),
        ({"roles": ["admin", 7]}, "bad roles"),
        ({"sub": ""}, "bad subject"),
        ({"sub": 42}, "bad subject"),
        ({"jti": ""}, "bad token id"),
        ({"jti": ["x"]}, "bad token id"),
        ({"exp": "tomorrow"}, "bad time claim"),
        ({"iat": True}, "bad time claim"),
        ({"nbf": None, "exp": None}, "missing claim"),
    ],
)
def test_claims_of_the_wrong_type_are_refused(
    keys: Keys, changes: dict[str, Any], expected: str
) -> None:
    """roles must be a list of strings, sub and jti non-empty strings, times numbers."""
    assert (
        reason(TokenVerifier(keys.settings, keys.verifying), signed(keys, claims(**changes)))
        == expected
    )


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "missing token"),
        ("", "missing token"),
        (b"a.b.c", "malformed"),
        ("not-a-token", "malformed"),
        ("a.b.c", "malformed"),
        ("x" * (tokens.MAX_TOKEN_LENGTH + 1), "malformed"),
        (b64url(b"[1]") + ".e30.", "malformed"),
    ],
)
def test_garbage_is_refused_as_malformed(
    all_keys: dict[str, Keys], token: Any, expected: str
) -> None:
    """Whatever arrives in auth_token, the verifier answers with a mesh error."""
    keys = all_keys["EdDSA"]
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == expected


def test_payload_that_is_not_an_object_is_malformed(keys: Keys) -> None:
    """A correctly signed payload that is a JSON list, not an object, is refused."""
    token = jwt.api_jws.encode(b"[1, 2]", keys.signing, algorithm=keys.algorithm)
    assert reason(TokenVerifier(keys.settings, keys.verifying), token) == "malformed"


# Revocation


def test_revoked_token_is_refused_and_stays_revoked_after_reopen(
    keys: Keys, tmp_path: Path
) -> None:
    """A revoked jti is refused, also by a fresh verifier over the reopened store."""
    token = TokenIssuer(keys.settings, keys.signing).issue("tool-1", [], TTL, NOW)
    identity = TokenVerifier(keys.settings, keys.verifying).verify(token, NOW)
    with Revocations(tmp_path / "revoked.db") as revocations:
        revocations.revoke(identity.jti, identity.expires, NOW)
        verifier = TokenVerifier(keys.settings, keys.verifying, revocations)
        assert refusal(verifier, token, kind=TokenRevokedError).details == {"reason": "revoked"}
    with Revocations(tmp_path / "revoked.db") as reopened:
        verifier = TokenVerifier(keys.settings, keys.verifying, reopened)
        refusal(verifier, token, NOW + 1, kind=TokenRevokedError)


def test_revocations_store_is_wal_and_prunes_expired_entries(tmp_path: Path) -> None:
    """prune drops entries once their tokens are past exp plus the grace; the drop persists."""
    path = tmp_path / "revoked.db"
    with Revocations(path) as revocations:
        revocations.revoke("short", NOW + 10, NOW)
        revocations.revoke("long", NOW + 3600, NOW)
        revocations.revoke("long", NOW + 10, NOW)  # again: the later expiry is kept
        assert (
            len(revocations) == 2
            and "short" in revocations
            and 42 not in revocations
            and [] not in revocations
        )
        assert revocations.prune(NOW + 10 + DEFAULT_GRACE_S - 1) == 0
        assert revocations.prune(NOW + 11 + DEFAULT_GRACE_S) == 1
        assert "short" not in revocations and "long" in revocations
    with Revocations(path) as reopened:
        assert "short" not in reopened and "long" in reopened and len(reopened) == 1
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_revocations_refuse_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A corrupt store is a configuration error, not an sqlite3 exception."""
    path = tmp_path / "revoked.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigurationError):
        Revocations(path)


# Cache


def test_second_verify_is_a_cache_hit(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second verify of a token does not check its signature again."""
    counter = DecodeCounter(monkeypatch)
    token = TokenIssuer(keys.settings, keys.signing).issue("tool-1", ["reader"], TTL, NOW)
    verifier = TokenVerifier(keys.settings, keys.verifying)
    first = verifier.verify(token, NOW)
    second = verifier.verify(token, NOW + 1)
    assert first == second and counter.calls == 1 and len(verifier) == 1


def test_cache_hit_still_checks_revocation_and_expiry(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revoking a cached token takes effect at once; a cached token expires on time."""
    counter = DecodeCounter(monkeypatch)
    revoked: set[str] = set()
    issuer = TokenIssuer(keys.settings, keys.signing)
    verifier = TokenVerifier(keys.settings, keys.verifying, revoked)
    token, other = issuer.issue("tool-1", [], TTL, NOW), issuer.issue("tool-2", [], TTL, NOW)
    revoked.add(verifier.verify(token, NOW).jti)
    refusal(verifier, token, NOW + 1, kind=TokenRevokedError)
    verifier.verify(other, NOW)
    refusal(verifier, other, NOW + TTL + LEEWAY, kind=TokenExpiredError)
    assert counter.calls == 2  # the refusals came from the cache
    assert len(verifier) == 1  # the expired entry is gone, the revoked one answers cheaply


def test_cache_is_bounded_dropping_expired_then_oldest(
    all_keys: dict[str, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full cache first forgets expired tokens, then the oldest ones; it never grows past its size."""
    keys = all_keys["HS256"]
    issuer = TokenIssuer(keys.settings, keys.signing)
    verifier = TokenVerifier(keys.settings, keys.verifying, cache_size=10)
    for _ in range(10):
        verifier.verify(issuer.issue("short", [], 10, NOW), NOW)
    assert len(verifier) == 10
    later = NOW + 100
    fresh = [issuer.issue(f"tool-{n}", [], TTL, later) for n in range(25)]
    verifier.verify(fresh[0], later)
    assert len(verifier) == 1  # all ten expired entries were swept
    for token in fresh[1:]:
        verifier.verify(token, later)
        assert len(verifier) <= 10
    counter = DecodeCounter(monkeypatch)
    verifier.verify(fresh[-1], later)
    assert counter.calls == 0  # the newest is still cached
    verifier.verify(fresh[0], later)
    assert counter.calls == 1  # the oldest was dropped and is verified again


# Key sets, other implementations


def test_jwks_verifier_picks_the_key_by_kid(keys: Keys, tmp_path: Path) -> None:
    """A verifier over a two-key JWKS file accepts tokens from both keys and refuses unknown kids."""
    write_jwks(tmp_path / "jwks.json", [keys.other, keys.verifying])
    key_set = load_jwks(tmp_path / "jwks.json", keys.algorithm)  # type: ignore[arg-type]
    verifier = TokenVerifier(keys.settings, key_set)
    for signing in (keys.signing, keys.other):
        token = TokenIssuer(keys.settings, signing).issue("tool-1", ["reader"], TTL, NOW)
        assert verifier.verify(token, NOW).roles == {"reader"}
    assert (
        reason(
            verifier,
            jwt.encode(claims(), keys.signing, algorithm=keys.algorithm, headers={"kid": "nope"}),
        )
        == "unknown key"
    )
    assert reason(verifier, signed(keys, claims())) == "unknown key"  # no kid, two keys
    mode = stat.S_IMODE((tmp_path / "jwks.json").stat().st_mode)
    assert mode == (0o600 if keys.algorithm == "HS256" else 0o644)


def test_jwks_without_kid_is_indexed_by_thumbprint(keys: Keys, tmp_path: Path) -> None:
    """A JWKS written elsewhere without kid still verifies our tokens (kid is the RFC 7638 thumbprint)."""
    member = {
        name: value
        for name, value in jwk(keys.verifying).items()
        if name not in ("kid", "alg", "use")
    }
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [member]}))
    verifier = TokenVerifier(keys.settings, load_jwks(tmp_path / "jwks.json", keys.algorithm))  # type: ignore[arg-type]
    token = TokenIssuer(keys.settings, keys.signing).issue("tool-1", [], TTL, NOW)
    assert verifier.verify(token, NOW).subject == "tool-1"
    assert verifier.verify(signed(keys, claims()), NOW).subject == "tool-1"  # no kid, one key


def joserfc_key(keys: Keys) -> Any:
    if keys.algorithm == "HS256":
        return OctKey.import_key(keys.signing)
    assert keys.pem_path is not None
    key_class = OKPKey if keys.algorithm == "EdDSA" else RSAKey
    return key_class.import_key(keys.pem_path.read_bytes())


def test_tokens_made_by_joserfc_are_accepted(keys: Keys) -> None:
    """Another JWT implementation, with the same key files, makes tokens our verifier accepts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc flags EdDSA as deprecated by RFC 9864
        token = jose_jwt.encode(
            {"alg": keys.algorithm}, claims(), joserfc_key(keys), algorithms=[keys.algorithm]
        )
    identity = TokenVerifier(keys.settings, keys.verifying).verify(token, NOW)
    assert identity == Identity(
        "tool-1", frozenset({"reader", "writer"}), "0123456789abcdef", NOW + TTL, NOW
    )


def test_our_tokens_verify_with_joserfc(keys: Keys) -> None:
    """The other way round: joserfc verifies our tokens, and its thumbprint is our kid."""
    key = joserfc_key(keys)
    token = TokenIssuer(keys.settings, keys.signing).issue("tool-1", ["reader"], TTL, NOW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = jose_jwt.decode(token, key, algorithms=[keys.algorithm])
    assert decoded.claims["sub"] == "tool-1" and decoded.claims["roles"] == ["reader"]
    assert decoded.header["kid"] == key.thumbprint()


# Renewal


def test_renew_gives_a_fresh_token_for_the_same_caller(keys: Keys) -> None:
    """renew keeps subject and roles, with a new jti and a new expiry."""
    issuer = TokenIssuer(keys.settings, keys.signing)
    verifier = TokenVerifier(keys.settings, keys.verifying)
    old = verifier.verify(issuer.issue("tool-1", ["reader"], TTL, NOW), NOW)
    new = verifier.verify(issuer.renew(old, NOW + 300, TTL), NOW + 300)
    assert (new.subject, new.roles) == (old.subject, old.roles)
    assert new.jti != old.jti and new.expires == old.expires + 300


def test_expired_identity_cannot_be_renewed(keys: Keys) -> None:
    """An expired token cannot be traded for a live one."""
    issuer = TokenIssuer(keys.settings, keys.signing)
    identity = Identity("tool-1", frozenset(), "j", NOW, NOW - TTL)
    with pytest.raises(TokenExpiredError):
        issuer.renew(identity, NOW + LEEWAY, TTL)


@pytest.mark.parametrize(
    ("subject", "roles", "ttl"),
    [("", [], TTL), ("tool-1", [""], TTL), ("tool-1", [3], TTL), ("tool-1", [], 0)],
)
def test_issue_refuses_bad_arguments(
    all_keys: dict[str, Keys], subject: str, roles: list[Any], ttl: float
) -> None:
    """The issuer never makes a token the verifier would refuse."""
    keys = all_keys["HS256"]
    with pytest.raises(ValueError):
        TokenIssuer(keys.settings, keys.signing).issue(subject, roles, ttl, NOW)


# Configuration and key files


def test_key_that_does_not_fit_the_algorithm_is_a_configuration_error(
    all_keys: dict[str, Keys],
) -> None:
    """Issuer and verifier refuse a key of another algorithm, a public key for signing, a short secret."""
    rs, ed, hs = all_keys["RS256"], all_keys["EdDSA"], all_keys["HS256"]
    attempts: list[Callable[[], object]] = [
        lambda: TokenVerifier(rs.settings, ed.verifying),
        lambda: TokenVerifier(hs.settings, rs.verifying),
        lambda: TokenIssuer(rs.settings, hs.signing),
        lambda: TokenIssuer(ed.settings, ed.verifying),
        lambda: TokenVerifier(hs.settings, b"short"),
        lambda: TokenVerifier(hs.settings, hs.verifying, cache_size=0),
        lambda: TokenVerifier(hs.settings, KeySet({})),
        lambda: TokenSettings("HS512", ISSUER, AUDIENCE),  # type: ignore[arg-type]
        lambda: TokenSettings("HS256", "", AUDIENCE),
        lambda: TokenSettings("HS256", ISSUER, AUDIENCE, leeway=-1),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigurationError):
            attempt()


def test_a_private_key_also_verifies(keys: Keys) -> None:
    """A broker that issues and verifies can hand the verifier its private key."""
    token = TokenIssuer(keys.settings, keys.signing).issue("tool-1", [], TTL, NOW)
    assert TokenVerifier(keys.settings, keys.signing).verify(token, NOW).subject == "tool-1"


def test_generated_key_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    """Secrets and private keys are 0600, public keys sit next to them, and existing files are kept."""
    generate_secret(tmp_path / "secret")
    generate_private_key(tmp_path / "ed.pem", "EdDSA")
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ed.pem").stat().st_mode) == 0o600
    assert public_key_path(tmp_path / "ed.pem") == tmp_path / "ed.pub"
    assert (tmp_path / "ed.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "ed.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = (tmp_path / "secret").read_bytes()
    with pytest.raises(ConfigurationError):
        generate_secret(tmp_path / "secret")
    with pytest.raises(ConfigurationError):
        generate_private_key(tmp_path / "ed.pem", "EdDSA")
    assert (tmp_path / "secret").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ed.pem",
        "ed.pub",
        "secret",
    ]  # no temp files left
    assert len(load_secret(tmp_path / "secret")) == 32


def test_unusable_key_files_are_configuration_errors(tmp_path: Path) -> None:
    """Missing, garbled or too-short key material is reported as configuration, never as a library error."""
    (tmp_path / "garbage").write_text("not a key\n")
    (tmp_path / "short").write_text(base64.b64encode(b"x" * 16).decode())
    (tmp_path / "empty.json").write_text(json.dumps({"keys": []}))
    for attempt in (
        lambda: load_secret(tmp_path / "missing"),
        lambda: load_secret(tmp_path / "garbage"),
        lambda: load_secret(tmp_path / "short"),
        lambda: load_private_key(tmp_path / "garbage"),
        lambda: load_public_key(tmp_path / "garbage"),
        lambda: load_jwks(tmp_path / "garbage", "EdDSA"),
        lambda: load_jwks(tmp_path / "empty.json", "EdDSA"),
        lambda: generate_private_key(tmp_path / "x.pem", "HS256"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ConfigurationError):
            attempt()


def test_jwks_with_keys_of_another_algorithm_only_is_refused(
    all_keys: dict[str, Keys], tmp_path: Path
) -> None:
    """An RS256 deployment finds nothing usable in a JWKS of Ed25519 keys."""
    write_jwks(tmp_path / "jwks.json", [all_keys["EdDSA"].verifying])
    with pytest.raises(ConfigurationError):
        load_jwks(tmp_path / "jwks.json", "RS256")
