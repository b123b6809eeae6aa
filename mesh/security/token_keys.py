"""Token key files: HS256 secrets, EdDSA and RS256 key pairs, JWKS files.

Rules of this module:

* Everything here does file I/O; `tokens.py` (issuing and verifying) never does.
* A key file is never overwritten (replacing a key locks its holders out), secrets and
  private keys are written owner-only, atomically (`files.write_file_atomic`).
* Errors are `ConfigurationError`s naming the file, never its content.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ..protocol import ConfigurationError
from .files import write_file_atomic
from .tokens import (
    GENERATED_RSA_BITS,
    MIN_SECRET_BYTES,
    Algorithm,
    KeySet,
    VerifyKey,
    algorithm_of,
    jwk,
)

__all__ = [
    "generate_private_key",
    "generate_secret",
    "load_jwks",
    "load_private_key",
    "load_public_key",
    "load_secret",
    "public_key_path",
    "write_jwks",
]

def public_key_path(path: str | os.PathLike[str]) -> Path:
    """Where `generate_private_key(path)` puts the public key: `path` with suffix `.pub`.

    The same convention as `signing.public_key_path`: `state/jwt.key` -> `state/jwt.pub`.
    """
    return Path(path).with_suffix(".pub")


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a key file that must not exist yet: replacing a key locks its holders out."""
    if path.exists():
        raise ConfigurationError(
            "key file exists; refusing to overwrite it", details={"path": str(path)}
        )
    write_file_atomic(path, data, mode)


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigurationError(
            f"cannot read key file {path}: {error.strerror}", details={"path": str(path)}
        ) from None


def generate_secret(path: str | os.PathLike[str]) -> None:
    """Create an HS256 secret file: 32 random bytes as base64 text, mode 0600.

    Args:
        path: the file to create; it must not exist.

    Raises:
        ConfigurationError: the file exists or cannot be written.
    """
    secret = base64.b64encode(os.urandom(MIN_SECRET_BYTES)) + b"\n"
    _create(Path(path), secret, 0o600)


def generate_private_key(
    path: str | os.PathLike[str], algorithm: Literal["EdDSA", "RS256"]
) -> None:
    """Create a signing key pair: Ed25519 for EdDSA, RSA 3072 for RS256.

    The private key is PEM PKCS8, unencrypted, mode 0600 (the state directory protects
    it); the public key is PEM SubjectPublicKeyInfo at `public_key_path(path)`, 0644.

    Args:
        path: the private key file to create; neither it nor `public_key_path(path)` may exist.
        algorithm: "EdDSA" or "RS256".

    Raises:
        ConfigurationError: an unsupported algorithm, or a file exists or cannot be
            written.
    """
    path, pub_path = Path(path), public_key_path(path)
    if pub_path == path:
        raise ConfigurationError(
            "a private key file must not end in .pub", details={"path": str(path)}
        )
    for existing in (path, pub_path):
        if existing.exists():
            raise ConfigurationError(
                "key file exists; refusing to overwrite it", details={"path": str(existing)}
            )
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
    else:
        raise ConfigurationError(
            "key pairs exist only for EdDSA and RS256", details={"algorithm": algorithm}
        )
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create(path, private_pem, 0o600)
    _create(pub_path, public_pem, 0o644)


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read an HS256 secret written by `generate_secret`.

    Args:
        path: the secret file.

    Returns:
        The raw secret bytes.

    Raises:
        ConfigurationError: unreadable, not base64, or shorter than 32 bytes.
    """
    try:
        secret = base64.b64decode(_read(path).strip(), validate=True)
    except ValueError:
        raise ConfigurationError(
            "secret file is not base64 text", details={"path": str(path)}
        ) from None
    algorithm_of(secret)  # refuses a short secret
    return secret


def load_private_key(path: str | os.PathLike[str]) -> ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
    """Read a PEM private key for signing tokens.

    Args:
        path: an unencrypted PEM private key file (Ed25519 or RSA).

    Returns:
        The key object to hand to `TokenIssuer`.

    Raises:
        ConfigurationError: unreadable, not a PEM private key, or not Ed25519 / RSA.
    """
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(
            "not an unencrypted PEM private key", details={"path": str(path)}
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ConfigurationError(
            "private key is neither Ed25519 nor RSA", details={"path": str(path)}
        )
    return key


def load_public_key(path: str | os.PathLike[str]) -> ed25519.Ed25519PublicKey | rsa.RSAPublicKey:
    """Read a PEM public key for verifying tokens.

    Args:
        path: a PEM SubjectPublicKeyInfo file (Ed25519 or RSA), e.g. `<key>.pub`.

    Returns:
        The key object to hand to `TokenVerifier`.

    Raises:
        ConfigurationError: unreadable, not a PEM public key, or not Ed25519 / RSA.
    """
    try:
        key = serialization.load_pem_public_key(_read(path))
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigurationError("not a PEM public key", details={"path": str(path)}) from None
    if not isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise ConfigurationError(
            "public key is neither Ed25519 nor RSA", details={"path": str(path)}
        )
    return key


def write_jwks(path: str | os.PathLike[str], keys: Collection[VerifyKey]) -> None:
    """Create a JWKS file (`{"keys": [...]}`) of the keys' verifying halves.

    Mode 0600 when it holds an HS256 secret, 0644 otherwise.

    Args:
        path: the file to create; it must not exist.
        keys: the keys to publish, e.g. the current and the next signing key.

    Raises:
        ConfigurationError: an unsupported key, or the file exists or cannot be written.
    """
    members = [jwk(key) for key in keys]
    secret = any(member["kty"] == "oct" for member in members)
    data = json.dumps({"keys": members}, indent=2).encode("utf-8")
    _create(Path(path), data, 0o600 if secret else 0o644)


def load_jwks(path: str | os.PathLike[str], algorithm: Algorithm) -> KeySet:
    """Read a JWKS file, keeping the keys usable with `algorithm`.

    A key is indexed by its `kid`, or by its RFC 7638 thumbprint when it has none (the
    `kid` that `TokenIssuer` writes). Keys PyJWT cannot use are skipped.

    Args:
        path: a JSON file with a "keys" list.
        algorithm: the deployment's token algorithm.

    Returns:
        The key set to hand to `TokenVerifier`.

    Raises:
        ConfigurationError: unreadable, not a JWKS, or no usable key for `algorithm`.
    """
    try:
        document = json.loads(_read(path))
        key_set = jwt.PyJWKSet.from_dict(document)
    except (ValueError, AttributeError, jwt.PyJWTError):
        # The library's messages may quote key material: keep them out of ours.
        raise ConfigurationError("not a usable JWKS file", details={"path": str(path)}) from None
    keys: dict[str, VerifyKey] = {}
    for member in key_set.keys:
        if member.algorithm_name != algorithm:
            continue
        try:
            algorithm_of(member.key)
        except ConfigurationError:
            continue
        keys[member.key_id or jwk(member.key)["kid"]] = member.key
    if not keys:
        raise ConfigurationError(
            "JWKS file holds no key for the token algorithm",
            details={"path": str(path), "algorithm": algorithm},
        )
    return KeySet(keys)
