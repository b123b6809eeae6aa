"""Certificates for tests of the HTTPS listeners (the monitor, the MCP bridge over HTTP).

`self_signed_certificate` makes the PEM files `--tls-cert` / `--tls-key` take, in a
directory the test owns, so no test depends on a certificate of the machine.
"""

from __future__ import annotations

import os

__all__ = ["self_signed_certificate"]


def self_signed_certificate(directory: str | os.PathLike[str]) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (valid a day) and its key.

    Returns:
        The paths of `cert.pem` and `key.pem` (unencrypted, 0600) written in `directory`.
    """
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh test")])
    now = datetime.datetime.now(datetime.UTC)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(names, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(b"")
    key_path.chmod(0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)
